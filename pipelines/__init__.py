"""Product pipelines the CLI calls: participant sessions, the closed loop, batch extract/fit,
reports and RL evaluation. They compose services and their cores; services never import them."""
