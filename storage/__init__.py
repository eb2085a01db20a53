"""Result storage (issue 4): S3-compatible stores for saved values, and result signing."""
