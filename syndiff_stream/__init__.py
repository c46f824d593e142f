"""syndiff-stream: real-time polyp segmentation for colonoscopy video with a single-step
latent diffusion segmenter."""

__version__ = "0.1.0"
