from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('haia', '0002_message_attempt')]

    initial = False

    operations = [
        ops.CreateModel(
            name='Blob',
            fields=[
                ('sha256', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64)),
                ('media_type', fields.CharField(max_length=100)),
                ('data', fields.BinaryField()),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={'table': 'haia_blob', 'app': 'haia', 'pk_attr': 'sha256', 'table_description': 'An image a message carried (a `data:` URL), stored once by content digest: conversations'},
            bases=['Model'],
        ),
        ops.AddField(
            model_name='Message',
            name='parts',
            field=fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads),
        ),
        ops.AddField(
            model_name='Message',
            name='reasoning',
            field=fields.TextField(default='', db_default='', unique=False),
        ),
        ops.AddField(
            model_name='Message',
            name='reasoning_parts',
            field=fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads),
        ),
        ops.AddField(
            model_name='Message',
            name='tool_call_id',
            field=fields.CharField(null=True, max_length=200),
        ),
        ops.AddField(
            model_name='Message',
            name='tool_calls',
            field=fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads),
        ),
    ]
