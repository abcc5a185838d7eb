"""What the model wrote, as events: the thinking split, Qwen3-coder XML tool calls, constraints. Fed token by token
by the engine (one parser per sequence); depends on nothing in ``serve/``."""
