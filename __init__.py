"""safekeel: keep a language model's refusals while you fine-tune it.

Installed as one package; the repo's folders are its subpackages: `safekeel.annotate`,
`safekeel.train`, `safekeel.evaluate`, `safekeel.data`, and the CLI `safekeel.pipeline`.
"""

__version__ = "0.1.0"
