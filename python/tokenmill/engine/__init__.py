"""The engine layer: the native core (reached only through `native`) and its owning wrappers
(`model.EngineModel`, `model.KVCache`), cache specs, HF configs and the default model."""
