"""A character-level Hugging Face tokenizer for the built-in tasks; built locally, never downloaded.

Every character of the task's alphabet is one token. The tokenizer is a `tokenizers` BPE model with
no merges (so a string splits into its characters), wrapped in `PreTrainedTokenizerFast`: it saves
with `save_pretrained` and loads back with `AutoTokenizer.from_pretrained` like any hub tokenizer.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, USER, ASSISTANT)  # ids 0..5, in this order

# `{{ bos_token }}` is part of the template (as in Llama's): text rendered by it is tokenized with
# `add_special_tokens=False`, which is what `apply_chat_template(tokenize=True)` does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    + ASSISTANT
    + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('only the user and assistant roles are supported') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `alphabet` plus the special and chat tokens.

    Ids: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, `<|user|>`=4, `<|assistant|>`=5, then the
    characters of `alphabet` in order (duplicates dropped). Characters outside the alphabet encode
    as `<unk>`. With `add_special_tokens=True` (the default) the encoding starts with `<s>`; no eos
    is appended. `decode(..., skip_special_tokens=True)` gives back the text exactly (no spaces are
    inserted between characters).

    Args:
        alphabet: the characters that are tokens, e.g. `"0123456789+-="`.

    Returns:
        A `PreTrainedTokenizerFast` with bos/eos/pad/unk and a chat template set.
    """
    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("alphabet must contain at least one character")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    backend.decoder = decoders.Fuse()  # concatenate tokens: no spaces between characters
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
