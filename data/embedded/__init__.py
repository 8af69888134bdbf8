"""The embedded default as data: a synthetic world (`world`), tiny Llamas and word-level
tokenizers (`tiny_models`), and the tiny policy's and guard's settings, chat format and
measures (`default`). Building the models with the stages is `safekeel.recipe`'s job."""
