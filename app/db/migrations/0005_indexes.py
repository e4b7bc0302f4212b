from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise.indexes import Index

class Migration(migrations.Migration):
    dependencies = [('haia', '0004_responses')]

    initial = False

    operations = [
        ops.AddIndex(
            model_name='ChatLink',
            index=Index(fields=['conversation_id']),
        ),
        ops.AddIndex(
            model_name='Conversation',
            index=Index(fields=['parent_id']),
        ),
        ops.AddIndex(
            model_name='Conversation',
            index=Index(fields=['owner', 'updated_at', 'id']),
        ),
        ops.AddIndex(
            model_name='Message',
            index=Index(fields=['conversation_id', 'id']),
        ),
        ops.AddIndex(
            model_name='Message',
            index=Index(fields=['status', 'id']),
        ),
        ops.AddIndex(
            model_name='Response',
            index=Index(fields=['conversation_id']),
        ),
    ]
