from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from tortoise.fields.base import OnDelete
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('haia', '0003_chat_surface')]

    initial = False

    operations = [
        ops.CreateModel(
            name='Response',
            fields=[
                ('id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64)),
                ('owner', fields.CharField(default='', db_index=True, max_length=200)),
                ('conversation', fields.ForeignKeyField('haia.Conversation', source_field='conversation_id', db_constraint=True, to_field='id', related_name='responses', on_delete=OnDelete.CASCADE)),
                ('meta', fields.JSONField(default=dict, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('input', fields.JSONField(default=list, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('store', fields.BooleanField(default=True)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={'table': 'haia_response', 'app': 'haia', 'pk_attr': 'id', 'table_description': "A Responses API response: its request's metadata and input items. Its generation is the"},
            bases=['Model'],
        ),
    ]
