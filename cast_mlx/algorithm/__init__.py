"""The algorithm of the spec (docs/cast-spec.md, sections 2-5): the advantage math
(`advantages`) and the estimators registered by name (`estimators`), the clipped policy
loss (`loss`), their compiled forms (`compiled`) and the self-teacher (`teacher`). Imports
the engine, never tasks or training."""
