"""The data: task definitions and metrics, the CS224N files and their reader, and the
input pipeline that turns them into padded or packed global batches."""
