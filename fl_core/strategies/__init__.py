"""Server halves of the methods: one strategy per module, a small common base."""
