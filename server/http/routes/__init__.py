"""HTTP routes: thin handlers that validate, call one service, and map the result."""
