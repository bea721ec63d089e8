"""Reading and writing through fsspec: any URI (file://, memory://, s3://), atomic commits."""
