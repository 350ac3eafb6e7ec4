"""The OpenAI-compatible API (/v1): a soft prompt is a `model`; errors in OpenAI's shape."""
