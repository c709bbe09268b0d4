"""The GPU side of sdfarm: model loading, the sampling loop, schedulers and the render command."""
