from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('haia', '0001_initial')]

    initial = False

    operations = [
        ops.AddField(
            model_name='Message',
            name='attempt',
            field=fields.IntField(default=0, db_default=0),
        ),
    ]
