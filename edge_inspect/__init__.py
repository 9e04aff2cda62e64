"""edge-inspect: the product-level commands (the demo) that tie trainer, engines and daemon together."""
