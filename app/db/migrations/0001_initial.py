from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from app.db.models import Status, new_conversation_id
from json import dumps, loads
from tortoise.fields.base import OnDelete
from tortoise import fields

class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name='Conversation',
            fields=[
                ('id', fields.CharField(primary_key=True, default=new_conversation_id, unique=True, db_index=True, max_length=64)),
                ('owner', fields.CharField(default='', db_index=True, max_length=200)),
                ('title', fields.CharField(default='', max_length=200)),
                ('title_from_task', fields.BooleanField(default=False)),
                ('parent', fields.ForeignKeyField('haia.Conversation', source_field='parent_id', null=True, db_constraint=True, to_field='id', related_name='branches', on_delete=OnDelete.SET_NULL)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
            ],
            options={'table': 'haia_conversation', 'app': 'haia', 'pk_attr': 'id', 'table_description': 'A chat: an ordered list of messages, belonging to one owner.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='ChatLink',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('owner', fields.CharField(max_length=200)),
                ('external_id', fields.CharField(max_length=200)),
                ('conversation', fields.ForeignKeyField('haia.Conversation', source_field='conversation_id', db_constraint=True, to_field='id', related_name='links', on_delete=OnDelete.CASCADE)),
            ],
            options={'table': 'haia_chat_link', 'app': 'haia', 'unique_together': (('owner', 'external_id'),), 'pk_attr': 'id', 'table_description': "A client's own chat id (OpenWebUI's `X-OpenWebUI-Chat-Id`) → its current conversation."},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Message',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('conversation', fields.ForeignKeyField('haia.Conversation', source_field='conversation_id', db_constraint=True, to_field='id', related_name='messages', on_delete=OnDelete.CASCADE)),
                ('role', fields.CharField(max_length=16)),
                ('content', fields.TextField(default='', unique=False)),
                ('status', fields.CharEnumField(default=Status.COMPLETED, description='QUEUED: queued\nIN_PROGRESS: in_progress\nCOMPLETED: completed\nFAILED: failed\nCANCELLED: cancelled\nINTERRUPTED: interrupted', enum_type=Status, max_length=16)),
                ('completion_id', fields.CharField(null=True, unique=True, max_length=64)),
                ('model', fields.CharField(null=True, max_length=200)),
                ('finish_reason', fields.CharField(null=True, max_length=32)),
                ('prompt_tokens', fields.IntField(null=True)),
                ('completion_tokens', fields.IntField(null=True)),
                ('error', fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('request_id', fields.CharField(null=True, max_length=128)),
                ('prefix_hash', fields.CharField(null=True, db_index=True, max_length=64)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('started_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('first_token_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('finished_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'haia_message', 'app': 'haia', 'pk_attr': 'id', 'table_description': 'One turn. Assistant turns carry their completion id, model, usage and timings.'},
            bases=['Model'],
        ),
    ]
