"""Answer normalization of the official VQA / EvalAI evaluation, and the lighter rules of other benchmarks.

The VQA rules (used for VQAv2 and TextVQA), in order:

1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space
   or when the text has a comma between two digits ("10,000" -> "10000"), and becomes a space otherwise
   ("t-shirt" -> "t shirt"); a period not followed by a digit is deleted ("yes." -> "yes", "1.5" stays);
   apostrophes are kept ("it's" and "its" stay different words);
3. lower case; number words zero..ten (and "none") become digits ("Two" -> "2"); the articles a, an, the
   are dropped ("a dog" -> "dog");
4. apostrophe-less contractions are fixed from the official list ("dont" -> "don't", "isnt" -> "isn't").
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The official table, grouped by the word's stem: {written without apostrophes: with them}.  It contains a few
# quirks of the original (capitalised keys that never match after lower-casing, "somebody'd" -> "somebodyd");
# they are kept so that scores equal the official ones.
_CONTRACTION_TABLE = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll
let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't
ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's
shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd
whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's
wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all
yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd
youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split(" ") for line in _CONTRACTION_TABLE.strip().splitlines()
                                    for pair in line.split("|"))


def _punctuation(text: str) -> str:
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(answer: str) -> str:
    """An answer as the official VQA evaluation compares it (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_punctuation(text))


def normalize_short(answer: str) -> str:
    """GQA / LLaVA style: whitespace stripped, trailing periods removed, lower case ("Red." -> "red")."""
    return " ".join(answer.strip().rstrip(".").strip().lower().split())


def yes_no_pope(answer: str) -> str:
    """POPE's rule: keep the first sentence; "no" if it contains the word No/no/not, else "yes"."""
    first = answer.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def yes_no_mme(answer: str) -> str:
    """MME's rule: "yes"/"no" if the (lower-cased) answer is that word or its first 4 characters contain it,
    else "other" (which is always wrong)."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return a
    head = a[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"
