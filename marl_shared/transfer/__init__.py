"""Transfer: load a pre-trained shared backbone into new tasks, freeze or fine-tune it."""
