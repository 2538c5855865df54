"""Reading images, datasets and pair lists."""
