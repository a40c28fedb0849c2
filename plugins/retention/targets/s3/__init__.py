"""S3 targets: listing, Object Lock, and the delete and archive actions."""
