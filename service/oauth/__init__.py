"""OAuth 2.0: token formats, client authentication, grants and their RFC errors."""
