from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise.fields.base import OnDelete
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('haia', '0001_initial')]

    initial = False

    operations = [
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
        ops.AlterModelOptions(
            name='Conversation',
            options={'table': 'haia_conversation', 'app': 'haia', 'pk_attr': 'id', 'table_description': 'A chat: an ordered list of messages, belonging to one owner.'},
        ),
        ops.AddField(
            model_name='Conversation',
            name='owner',
            field=fields.CharField(default='', db_index=True, max_length=200),
        ),
        ops.AddField(
            model_name='Conversation',
            name='parent',
            field=fields.ForeignKeyField('haia.Conversation', source_field='parent_id', null=True, db_constraint=True, to_field='id', related_name='branches', on_delete=OnDelete.SET_NULL),
        ),
        ops.AddField(
            model_name='Conversation',
            name='title_from_task',
            field=fields.BooleanField(default=False),
        ),
        ops.AddField(
            model_name='Message',
            name='prefix_hash',
            field=fields.CharField(null=True, db_index=True, max_length=64),
        ),
    ]
