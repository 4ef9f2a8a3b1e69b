"""Quality evaluations that compare kvserve's options against each other on a real model."""
