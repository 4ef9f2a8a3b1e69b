"""An aggregation task in the style of RULER's common-word extraction: a numbered list of words in
which one word is `share` of the items, and the question which word appears most often.

Passkey retrieval needs one needle, which exact top-k finds by its score; here the answer is spread
over many keys with ordinary scores, the case where MagicPIG's sampling argues it beats top-k."""
import random
import re

WORDS = """apple anchor arrow badge basket bell bench blanket boat bottle bridge brush bucket button
cabin cable camera candle canoe carpet castle chain chair cherry chimney circus clock cloud coat coin
comb compass cookie copper corn cotton crown curtain desert diamond dragon drum eagle engine feather
fence flag flute forest fountain garden garlic ghost glove goat guitar hammer harbor helmet honey
horse island jacket jungle kettle kitten ladder lamp lemon letter lizard magnet mango marble meadow
mirror monkey mountain needle nest ocean onion orange otter owl paddle palace panda parrot peach
pencil pepper piano pillow pirate planet pocket potato puzzle rabbit radio rainbow ribbon river
robot rocket saddle sailor salad sandal scarf shadow shell shovel silver spider spoon squirrel stable
statue sugar sweater sword table tiger tomato tower tractor trumpet tunnel turtle umbrella valley
violin wagon walnut whale whistle window wizard wolf yacht zebra""".split()
QUESTION = "Which word appears most often in the list above?"


def common_word_prompt(tokenizer, length: int, share: float, rng: random.Random) -> tuple[list[int], str]:
    """(prompt ids, the common word): a list a little under `length` tokens, in the chat template when
    the model has one (SmolLM2-135M answers nothing useful to the raw text)."""
    word = rng.choice(WORDS)
    others = [w for w in WORDS if w != word]

    def build(n: int) -> list[int]:
        common = round(share * n)
        items = [word] * common + [rng.choice(others) for _ in range(n - common)]
        rng.shuffle(items)
        text = ("Below is a numbered list of words. Read it and count how often each word appears.\n"
                + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(items)) + QUESTION)
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        return tokenizer.encode(text, add_special_tokens=not tokenizer.chat_template)

    room = length - 16  # the answer's tokens
    n = max(4, room // 5)
    for _ in range(3):  # items cost a few tokens each: rescale to the measured cost
        ids = build(n)
        if len(ids) <= room and len(ids) > room - 32:
            break
        n = max(4, int(n * room / len(ids)) - 1)
    while len(ids) > room and n > 4:
        n -= 4
        ids = build(n)
    return ids, word


def answered_word(answer: str) -> str | None:
    """The word the answer quotes (SmolLM2 says `The word "x" appears most often`), else the first
    word of the vocabulary in it."""
    quoted = re.search(r"[\"'“]([A-Za-z]+)[\"'”]", answer)
    if quoted:
        return quoted.group(1).lower()
    return next((w for w in re.findall(r"[a-z]+", answer.lower()) if w in WORDS), None)
