"""The API: one HTTP client per run, the endpoints as data, what the server says made safe."""
