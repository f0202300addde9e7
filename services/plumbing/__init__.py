"""What every service process shares: the ZeroMQ transport and client, CURVE security, the
recording format, the game core, metrics and health endpoints. No process lives here."""
