from pipelines.pipeline import GenerationOutput, Pipeline

__all__ = ["GenerationOutput", "Pipeline"]
