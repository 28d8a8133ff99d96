"""The algorithm of the spec (docs/cast-spec.md, sections 2-5): the registered advantage
estimators (`advantages`), the clipped policy loss (`loss`), their compiled forms
(`compiled`) and the self-teacher (`teacher`). Imports the engine, never tasks or training."""
