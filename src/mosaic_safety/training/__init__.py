"""Training control tokens: order-based sampling, self-distilled negatives, losses, the loop."""
