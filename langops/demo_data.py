"""A seeded generator of noisy customer-support tickets, so the pipeline runs end to end with no dataset.

The tickets are built to be *learnable but not trivial*: many templates and slot fillers, typos, random
casing and punctuation, filler phrases, a second sentence borrowed from a related class (a cancellation
that asks for a refund, a technical problem that mentions logging in), a few vague tickets and a little
label noise. Most borrowed sentences come with the cue people write ("Also, ...", "... Anyway, what I need
is this: ..."), which says that the ticket is about the *other* request. A bag of n-grams sees the cue but
not which sentence it belongs to; a model that reads the ticket in order can tell. On a 3,000-row demo a
TF-IDF + logistic-regression baseline scores about 80 macro-F1, and trained on 20,000 tickets about 83: the
rest needs the order of the words. Without the cues (the generator before them) the same baseline sat at
the demo's ceiling, 81 with 2,100 rows and 81 with 20,000, and no model could beat it beyond noise
(``benchmarks/demo_ceiling.py``).

``drift=`` makes the tickets a model in production would meet after the world changed, for monitoring demos
and tests: ``new_topic`` (a share of tickets about warranty repairs, a kind the model never saw, labelled
``warranty``), ``new_vocabulary`` (the same classes written about new products, devices and apps, with slang
and emoji) or ``class_mix`` (the same tickets in very different class shares).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import pandas as pd

from langops.io import LABEL, TEXT

# Share of each class before rounding: the largest class is about 2.2x the smallest.
CLASS_WEIGHTS: dict[str, float] = {
    "technical": 0.24,
    "billing": 0.20,
    "shipping": 0.17,
    "account": 0.15,
    "cancellation": 0.13,
    "feedback": 0.11,
}
DEMO_LABELS: tuple[str, ...] = tuple(CLASS_WEIGHTS)

LABEL_NOISE = 0.04  # share of tickets whose label is replaced by another class
RELATED_SENTENCE_RATE = 0.35  # share of tickets that borrow a sentence from a related class
UNMARKED_RELATED_SHARE = 1 / 3  # of those, the ones that do not say which request is the ticket's
VAGUE_RATE = 0.06  # share of tickets that are a vague one-liner shared by several classes
EXTRA_SENTENCE_RATE = 0.3  # share of tickets with a second sentence of their own class
TYPO_RATE = 0.035  # chance that a word longer than three letters gets a typo
MAX_ATTEMPTS = 50  # redraws per ticket to avoid repeating an earlier one

TEMPLATES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for order {order}, can you refund the duplicate payment of {amount}?",
        "My card was billed {amount} on {date} but I never authorised that charge.",
        "Why is my invoice for the {plan} higher than last month? It says {amount}.",
        "The promo code was not applied and I paid full price for the {product}.",
        "Can I get a copy of the invoice for order {order}? I need it for my expense report.",
        "There is a pending charge of {amount} on my statement that I don't recognise.",
        "Please update the payment method on file, my card ending {card} expired.",
        "I was overcharged for shipping on my last order, it was supposed to be free over {amount}.",
        "The tax on my receipt looks wrong, it was calculated on {amount} instead of the sale price.",
        "I returned the {product} {days} days ago and the refund of {amount} still isn't on my card.",
        "My card ending {card} keeps getting declined at payment even though it works everywhere else.",
        "I was billed for the {plan} after I downgraded to the free version.",
        "Can you split the payment for order {order} across two cards?",
        "My bank shows a charge from you for {amount} dated {date}, what is it for?",
        "The price of the {product} dropped the day after I paid, can I get the difference back?",
        "I got charged {amount} in currency conversion fees, your site said prices were in my currency.",
        "The gift card balance was not deducted from my total, I paid {amount} instead.",
        "Please send me a receipt with my company name {name} Ltd for the VAT refund.",
    ),
    "shipping": (
        "My order {order} was supposed to arrive {when} and it still hasn't shown up.",
        "The tracking number for my {product} hasn't updated in {days} days.",
        "{carrier} says the package was delivered but I never received it.",
        "The {product} arrived damaged, the box was completely crushed.",
        "Can I change the delivery address for order {order}? I'm moving to {city}.",
        "I received the wrong item, I ordered a {product} but got a {product2}.",
        "Do you ship to {country}? I can't select it at checkout.",
        "How long does express delivery take to {city}?",
        "Part of my order is missing, the {product} came but the {product2} did not.",
        "My package has been stuck in customs in {country} for {days} days, what do I need to do?",
        "Is there any way to speed up delivery of order {order}? It's a birthday gift for {date}.",
        "{carrier} left a note saying they couldn't deliver, how do I reschedule?",
        "My parcel went to my old address in {city}.",
        "The courier marked order {order} as undeliverable and is sending it back.",
        "Tracking says the {product} is in {city} but it has been there since {date}.",
        "Can the {product} be left with a neighbour? I'm not home on {date}.",
        "The delivery estimate keeps moving, first it said {date} and now it says {days} more days.",
    ),
    "technical": (
        "The {feature} keeps crashing on my {device}.",
        "I get error {error_code} whenever I try to open the {feature}.",
        "The site won't load in {browser}, it just shows a blank white screen.",
        "Since the last update the {feature} is extremely slow on my {device}.",
        "Notifications stopped working on my {device} after I updated the app.",
        "The {product} won't pair with my {device} over bluetooth.",
        "The firmware update for my {product} failed halfway and now it won't turn on.",
        "Sync between my {device} and the website is broken, changes don't show up.",
        "The checkout button does nothing when I click it in {browser}.",
        "I can't upload a photo from my {device}, it says the file format is not supported.",
        "The page times out with error {error_code} every time I search for the {product}.",
        "Images are missing and the layout is broken on my {device}.",
        "The mobile app disconnects from wifi every few minutes on my {device}.",
        "Export to CSV produces an empty file from the {feature}.",
        "The app freezes on the loading screen on {device}, reinstalling did not help.",
        "Dark mode makes the text in the {feature} unreadable on {browser}.",
        "The {product} shows a red blinking light and error {error_code} after setup.",
        "Voice commands for the {product} stopped working after the update on {date}.",
    ),
    "account": (
        "I can't log in on my {device}, it says my password is incorrect even after resetting it.",
        "I never received the password reset email I requested {when}, I checked spam too.",
        "How do I change the email address on my account? I lost access to the old one {when}.",
        "My account was locked after too many login attempts from my {device}.",
        "I think someone else accessed my account, there's a login from {city} that wasn't me.",
        "Please change the name on my profile, it still shows my old name {name}.",
        "The two-factor code never arrives on my {device}.",
        "I have two accounts with different emails and would like to merge them.",
        "Please delete my personal data from your system under GDPR.",
        "I want to add {name} as a second user on the {plan}.",
        "My profile settings won't save in {browser}, I keep losing my preferences.",
        "Can you verify my account? I uploaded my ID on {date}.",
        "I signed up with Google and now I can't log in with my email and password.",
        "My username was changed {when} without my permission.",
        "How do I turn on two-factor authentication? I use a {device}.",
        "The verification link in the sign-up email has expired, I signed up {when}.",
        "My account shows someone else's address in {city} and their phone number.",
    ),
    "cancellation": (
        "Please cancel my {plan}, I no longer need it.",
        "I want to cancel order {order} before it ships.",
        "How do I cancel my {plan}? I can't find the option anywhere.",
        "Cancel my {plan} effective immediately and confirm by email.",
        "I would like to end my {plan} at the end of this billing period.",
        "I placed order {order} by mistake, please cancel it.",
        "Turn off the auto-renewal on my {plan}, I don't want it to renew.",
        "I'm closing my account and cancelling everything, please confirm.",
        "Can I still cancel the {product} I ordered {when}? I found it cheaper elsewhere.",
        "I tried to cancel online but the page gives an error, please cancel my {plan} for me.",
        "Please terminate my contract, it ends {date} and I won't renew.",
        "I want to stop my {plan} trial before it converts to a paid plan.",
        "Cancel the recurring delivery of the {product}, I have enough.",
        "My partner signed me up for the {plan} without asking, cancel it please.",
        "I'd like to pause or cancel my subscription while I'm abroad in {country}.",
    ),
    "feedback": (
        "Just wanted to say the {product} is fantastic, best purchase this year.",
        "Your support agent {name} was incredibly helpful, thank you!",
        "The new {feature} design is confusing, I preferred the old layout.",
        "It would be great if you added {suggestion}.",
        "Delivery to {city} was super fast, really impressed.",
        "The quality of the {product} is disappointing for the price.",
        "I love the app but please add {suggestion}.",
        "Great service as always, keep it up.",
        "The checkout process has too many steps, please simplify it.",
        "Suggestion: {suggestion} would make my life easier.",
        "I've recommended your store to all my friends in {city}.",
        "The instructions that came with the {product} were hard to follow.",
        "Five stars for the {product}, it works exactly as described.",
        "The packaging for the {product} uses way too much plastic, please rethink it.",
        "I was on hold for {days} minutes before anyone answered, not great.",
        "The {feature} is much better since the redesign, nice work.",
    ),
}

# Classes whose sentences plausibly appear in a ticket of another class.
RELATED: dict[str, tuple[str, ...]] = {
    "billing": ("cancellation", "shipping", "account"),
    "shipping": ("billing", "cancellation", "feedback"),
    "technical": ("account", "billing", "feedback"),
    "account": ("technical", "billing", "cancellation"),
    "cancellation": ("billing", "shipping", "account"),
    "feedback": ("shipping", "technical", "billing"),
}

# How people mark a second request as an aside ("Also, ...") or the first as settled ("... Anyway, what I need
# is this: ..."). Either way the ticket's class is the other request: a model must read which sentence the cue
# belongs to, which a bag of n-grams cannot.
ASIDE_CUES: tuple[str, ...] = (
    "Also,",
    "Oh and",
    "Side note:",
    "Unrelated, but",
    "While I'm here,",
    "P.S.",
    "Another thing:",
    "By the way,",
)
MAIN_CUES: tuple[str, ...] = (
    "But the main issue:",
    "That's sorted now, though. My real problem:",
    "Anyway, what I need is this:",
    "Forget that, more urgent:",
    "That was last month. Today:",
    "Not why I'm writing though.",
)

# Short tickets that could belong to several classes.
VAGUE: tuple[str, ...] = (
    "I need help with order {order}.",
    "Something is wrong with my {plan}, please call me.",
    "Problem with the {product} again.",
    "Please look into my account, this is the third time I'm writing about the {product}.",
    "Question about the order I placed {when}.",
    "It still doesn't work, {days} days now.",
    "Can someone get back to me about {order}?",
    "Still waiting for an answer about the {product}.",
    "I emailed on {date} and nobody replied.",
)

GREETINGS: tuple[str, ...] = (
    "Hi,",
    "Hello,",
    "Hi there,",
    "Hey,",
    "Good morning,",
    "Dear support,",
    "Hello team,",
    "To whom it may concern,",
)
FILLERS: tuple[str, ...] = (
    "Please help.",
    "This is urgent.",
    "Thanks in advance.",
    "Sorry to bother you.",
    "I've been a customer for years.",
    "Any update would be appreciated.",
    "Can you look into this asap?",
    "Let me know what you need from me.",
    "I already tried contacting you by chat.",
    "pls reply",
)
SIGN_OFFS: tuple[str, ...] = (
    "Thanks, {name}",
    "Regards, {name}",
    "Cheers, {name}",
    "- {name}",
    "Best, {name}",
    "thx",
)

SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "product": (
        "wireless earbuds",
        "standing desk",
        "coffee grinder",
        "4K monitor",
        "yoga mat",
        "smart thermostat",
        "running shoes",
        "hiking backpack",
        "air fryer",
        "mechanical keyboard",
        "phone case",
        "desk lamp",
        "water bottle",
        "bluetooth speaker",
        "office chair",
        "blender",
        "winter jacket",
        "USB-C hub",
        "gaming mouse",
        "robot vacuum",
        "smart watch",
        "baby monitor",
        "e-reader",
        "security camera",
    ),
    "plan": (
        "Premium plan",
        "Basic plan",
        "family plan",
        "annual subscription",
        "Pro tier",
        "monthly membership",
        "student plan",
        "business account",
        "Plus subscription",
    ),
    "device": (
        "iPhone 13",
        "iPhone 15",
        "Pixel 7",
        "Galaxy S22",
        "iPad",
        "MacBook Air",
        "Windows 11 laptop",
        "Chromebook",
        "Android tablet",
        "Fire tablet",
        "OnePlus phone",
    ),
    "browser": ("Chrome", "Firefox", "Safari", "Edge", "Brave", "the Samsung browser"),
    "carrier": ("UPS", "FedEx", "DHL", "USPS", "Royal Mail", "The courier", "Your delivery partner"),
    "feature": (
        "checkout page",
        "mobile app",
        "search bar",
        "order history page",
        "dashboard",
        "wishlist",
        "photo upload",
        "live chat widget",
        "recommendations page",
        "settings menu",
    ),
    "city": (
        "Berlin",
        "Austin",
        "Manchester",
        "Lyon",
        "Toronto",
        "Melbourne",
        "Dublin",
        "Denver",
        "Leeds",
        "Porto",
    ),
    "country": ("Canada", "Norway", "Mexico", "Japan", "Brazil", "Switzerland", "New Zealand", "Poland"),
    "name": (
        "Maria",
        "James",
        "Priya",
        "Tom",
        "Aisha",
        "Lukas",
        "Sofia",
        "Daniel",
        "Mei",
        "Omar",
        "Hannah",
        "Carlos",
        "Elena",
        "Kwame",
        "Yuki",
        "Ben",
    ),
    "suggestion": (
        "a dark mode",
        "Apple Pay at checkout",
        "more colours for the {product}",
        "a way to save my cart",
        "gift wrapping",
        "an option to pick a delivery time",
        "order tracking in the app",
        "a size guide",
        "reviews with photos",
        "a loyalty programme",
    ),
}

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

SLOT_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "amount": lambda rng: rng.choice("$$$€£") + f"{rng.randint(4, 480)}.{rng.randint(0, 99):02d}",
    "order": lambda rng: rng.choice(("#", "#", "ORD-", "no. ", "")) + str(rng.randint(10000, 999999)),
    "days": lambda rng: str(rng.randint(2, 30)),
    "card": lambda rng: f"{rng.randint(0, 9999):04d}",
    "error_code": lambda rng: rng.choice(("E", "ERR-", "0x800", "code ")) + str(rng.randint(100, 999)),
    "date": lambda rng: rng.choice(
        (
            f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}",
            f"{rng.randint(1, 28)}/{rng.randint(1, 12):02d}",
            f"the {rng.randint(4, 20)}th",
        )
    ),
    "when": lambda rng: rng.choice(
        (
            "yesterday",
            "last Tuesday",
            "last week",
            "two weeks ago",
            "on Monday",
            f"{rng.randint(3, 20)} days ago",
            f"on {rng.choice(_MONTHS)} {rng.randint(1, 28)}",
        )
    ),
}


# ------------------------------------------------------------------------------------------- drift

Drift = Literal["new_topic", "new_vocabulary", "class_mix"]
DRIFTS: tuple[str, ...] = ("new_topic", "new_vocabulary", "class_mix")
NEW_TOPIC_LABEL = "warranty"
NEW_TOPIC_SHARE = 0.3  # share of tickets replaced by the new kind under drift="new_topic"
NEW_TOPIC_TEMPLATES: tuple[str, ...] = (
    "My {product} stopped working after {days} months, is it still under warranty?",
    "I'd like to file a warranty claim for the {product}, the hinge snapped.",
    "Where do I send the {product} for repair under the two-year guarantee?",
    "The repair centre in {city} says my {product} warranty is void, why?",
    "Can I extend the warranty on the {product} I bought {when}?",
    "The replacement {product} you sent under warranty has the same defect.",
    "How long does a warranty repair of the {product} usually take?",
    "Do I need the original receipt to claim the manufacturer guarantee on my {product}?",
    "The technician who came to fix the {product} under warranty never showed up on {date}.",
    "Is accidental damage to the {product} covered by the extended protection plan?",
)
# Class shares under drift="class_mix": the small classes become large and the large ones small.
DRIFTED_CLASS_WEIGHTS: dict[str, float] = {
    "technical": 0.06,
    "billing": 0.08,
    "shipping": 0.36,
    "account": 0.08,
    "cancellation": 0.30,
    "feedback": 0.12,
}
# Slot values under drift="new_vocabulary": products, devices, apps and plans the reference never named.
NEW_SLOT_VALUES: dict[str, tuple[str, ...]] = {
    **SLOT_VALUES,
    "product": ("e-bike battery", "VR headset", "heat pump", "sourdough starter kit", "drone gimbal",
                "solar power bank", "espresso tamper", "smart ring", "bidet seat", "pickleball paddle",
                "3D printer nozzle", "kombucha brewing jar"),
    "device": ("Quest 3", "Steam Deck", "Pixel Fold", "Galaxy Z Flip", "Framework laptop", "Vision Pro",
               "Nothing Phone", "Kindle Scribe"),
    "browser": ("Arc", "Vivaldi", "Opera GX", "DuckDuckGo browser"),
    "feature": ("AR try-on", "crypto wallet", "buy-now-pay-later widget", "AI stylist chatbot",
                "carbon footprint tracker", "QR code scanner"),
    "plan": ("Ultra bundle", "Flex pass", "Creator tier", "Eco membership"),
    "carrier": ("InPost locker", "the cargo bike courier", "Evri", "the drone drop service"),
}
NEW_FILLERS: tuple[str, ...] = (
    "ngl this is so mid 😤",
    "fr fr pls fix 🙏🙏",
    "lowkey annoyed rn 😡",
    "no cap this is the 3rd time 💀",
    "ty in advance ✌️",
    "smh 🤦",
    "istg if this isn't sorted by friday 😠",
)
NEW_FILLER_RATE = 0.6


class _Slots(dict[str, str]):
    """Fills one sentence's slots lazily, sampling only the slots it uses, each once."""

    def __init__(self, rng: random.Random, vocabulary: Mapping[str, tuple[str, ...]] = SLOT_VALUES) -> None:
        super().__init__()
        self._rng = rng
        self._vocabulary = vocabulary

    def __missing__(self, key: str) -> str:
        base = key.rstrip("0123456789")  # {product2} is a second, independent product
        if base in SLOT_GENERATORS:
            value = SLOT_GENERATORS[base](self._rng)
        else:
            value = self._rng.choice(self._vocabulary[base]).format_map(self)
        self[key] = value
        return value


def generate_demo_dataset(
    labels: Sequence[str], n_rows: int, seed: int, *, drift: Drift | None = None
) -> pd.DataFrame:
    """Generate ``n_rows`` support tickets over ``labels``, the same frame for the same seed.

    Tickets are written one after another, each from the ones before it only, so a larger ``n_rows`` gives
    the smaller frame followed by new rows: raising ``data.demo_rows`` grows the demo as a team's data grows.

    Args:
        labels: classes to generate, any subset of ``DEMO_LABELS``.
        n_rows: number of tickets; every class gets at least one.
        seed: the only source of randomness.
        drift: None for the usual tickets, or one of ``DRIFTS`` (module docstring); ``new_topic`` replaces
            ``NEW_TOPIC_SHARE`` of the tickets by warranty tickets labelled ``NEW_TOPIC_LABEL``.

    Returns:
        A frame with columns ``text`` and ``label``, rows in random order.

    Raises:
        ValueError: a label has no vocabulary, ``n_rows`` is smaller than the number of labels, or an unknown
            drift.
    """
    if drift is not None and drift not in DRIFTS:
        raise ValueError(f"unknown drift {drift!r}; use one of {list(DRIFTS)} or None")
    unknown = [label for label in labels if label not in TEMPLATES]
    if unknown:
        raise ValueError(
            f"no demo vocabulary for labels {unknown}; the demo generator knows {list(DEMO_LABELS)}"
        )
    if n_rows < len(labels):
        raise ValueError(f"n_rows={n_rows} is smaller than the number of labels ({len(labels)})")
    weights = DRIFTED_CLASS_WEIGHTS if drift == "class_mix" else CLASS_WEIGHTS
    # Separate streams: the classes and their label noise do not depend on how a drift writes the texts.
    true_labels = draw_labels(labels, n_rows, random.Random(f"{seed}-labels"), weights=weights)
    flip_rng = random.Random(f"{seed}-label-noise")
    observed = [flip_label(label, labels, flip_rng) for label in true_labels]
    rng = random.Random(seed)
    seen: set[str] = set()
    if drift == "new_vocabulary":
        texts = []
        for label in true_labels:
            text = write_unique_ticket(label, rng, seen, vocabulary=NEW_SLOT_VALUES)
            texts.append(f"{text} {rng.choice(NEW_FILLERS)}" if rng.random() < NEW_FILLER_RATE else text)
    else:
        texts = [write_unique_ticket(label, rng, seen) for label in true_labels]
    if drift == "new_topic":
        drift_rng = random.Random(f"{seed}-new_topic")
        for i in sorted(drift_rng.sample(range(n_rows), round(NEW_TOPIC_SHARE * n_rows))):
            texts[i] = write_new_topic_ticket(drift_rng, seen)
            observed[i] = NEW_TOPIC_LABEL
    return pd.DataFrame({TEXT: texts, LABEL: observed})


def write_new_topic_ticket(rng: random.Random, seen: set[str]) -> str:
    """A warranty ticket (the kind ``drift="new_topic"`` adds), noisy like the others and unique."""
    for _ in range(MAX_ATTEMPTS):
        sentences = [rng.choice(NEW_TOPIC_TEMPLATES)]
        if rng.random() < EXTRA_SENTENCE_RATE:
            sentences.append(rng.choice(NEW_TOPIC_TEMPLATES))
        if rng.random() < 0.4:
            sentences.insert(0, rng.choice(GREETINGS))
        if rng.random() < 0.3:
            sentences.append(rng.choice(SIGN_OFFS))
        slots = _Slots(rng)
        text = add_noise(" ".join(dict.fromkeys(sentence.format_map(slots) for sentence in sentences)), rng)
        if text.casefold() not in seen:
            break
    seen.add(text.casefold())
    return text


def draw_labels(
    labels: Sequence[str], n_rows: int, rng: random.Random, *, weights: Mapping[str, float] = CLASS_WEIGHTS
) -> list[str]:
    """Each class once, in random order, then classes drawn by ``weights``: no class is lost by chance, and
    the first rows never depend on how many follow."""
    first = list(labels)
    rng.shuffle(first)
    chosen = [weights[label] for label in labels]
    return first[:n_rows] + rng.choices(list(labels), weights=chosen, k=max(0, n_rows - len(first)))


def flip_label(label: str, labels: Sequence[str], rng: random.Random) -> str:
    """Label noise: real datasets carry a few mislabelled rows, and a model must not memorise them."""
    if rng.random() >= LABEL_NOISE:
        return label
    return rng.choice([other for other in labels if other != label])


def write_unique_ticket(
    label: str, rng: random.Random, seen: set[str], *, vocabulary: Mapping[str, tuple[str, ...]] = SLOT_VALUES
) -> str:
    """A ticket whose case-folded text is not in ``seen`` (then added to it).

    Repeated tickets would land in both train and test and fail validate's leakage check.
    """
    for _ in range(MAX_ATTEMPTS):
        text = write_ticket(label, rng, vocabulary=vocabulary)
        if text.casefold() not in seen:
            break
    seen.add(text.casefold())
    return text


def write_ticket(
    label: str, rng: random.Random, *, vocabulary: Mapping[str, tuple[str, ...]] = SLOT_VALUES
) -> str:
    """One ticket: greeting, the main sentence(s), maybe a related class's sentence and filler, sign-off.

    A related class's sentence mostly comes with a cue that says which request is the ticket's; a third of the
    time it does not, and the ticket stays ambiguous.
    """
    if rng.random() < VAGUE_RATE:
        sentences = [rng.choice(VAGUE)]
    else:
        sentences = [rng.choice(TEMPLATES[label])]
        if rng.random() < EXTRA_SENTENCE_RATE:
            sentences.append(rng.choice(TEMPLATES[label]))
        if rng.random() < RELATED_SENTENCE_RATE:
            related = rng.choice(TEMPLATES[rng.choice(RELATED[label])])
            roll = rng.random()
            if roll < UNMARKED_RELATED_SHARE:
                sentences.insert(rng.randrange(len(sentences) + 1), related)
            elif roll < (1 + UNMARKED_RELATED_SHARE) / 2:
                sentences.append(f"{rng.choice(ASIDE_CUES)} {lower_first(related)}")
            else:
                sentences = [related, rng.choice(MAIN_CUES), *sentences]
    if rng.random() < 0.3:
        sentences.append(rng.choice(FILLERS))
    if rng.random() < 0.4:
        sentences.insert(0, rng.choice(GREETINGS))
    if rng.random() < 0.3:
        sentences.append(rng.choice(SIGN_OFFS))
    text = " ".join(dict.fromkeys(sentence.format_map(_Slots(rng, vocabulary)) for sentence in sentences))
    return add_noise(text, rng)


def lower_first(sentence: str) -> str:
    """A sentence continued after a cue: "Also, my card ...", but "Also, I ..." and "Also, {carrier} ..."."""
    first = sentence.split(" ", 1)[0]
    if first == "I" or first.startswith("I'") or not first[:1].isupper():
        return sentence
    return sentence[0].lower() + sentence[1:]


def add_noise(text: str, rng: random.Random) -> str:
    """Typos, casing and punctuation the way people really type into a support form."""
    words = [
        add_typo(word, rng) if len(word) > 3 and rng.random() < TYPO_RATE else word for word in text.split()
    ]
    text = " ".join(words)
    roll = rng.random()
    if roll < 0.25:
        text = text.lower()
    elif roll < 0.28:
        text = text.upper()
    roll = rng.random()
    if roll < 0.15:
        text = text.rstrip(".!?")
    elif roll < 0.22:
        text = text.rstrip(".!?") + rng.choice(("!!", "!!!", "??", "...", " ?"))
    if rng.random() < 0.1:
        text = text.replace(", ", ",")
    return text


def add_typo(word: str, rng: random.Random) -> str:
    """Swap, drop or double one inner character."""
    i = rng.randrange(1, len(word) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]
