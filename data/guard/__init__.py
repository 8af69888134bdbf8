"""The guard LLM in one place: its settings (`settings.GuardSettings`), its prompt templates
(`templates`) and the Safety Critic that scores with it (`critic`). Annotate's critic and
STAR and evaluate's judge all serve the guard through these modules."""
