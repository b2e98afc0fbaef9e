"""Build a tiny, deterministic, random-weight Llama model that vLLM's CPU build can serve.

No model can be downloaded in CI or on developer machines without hub access, so the
end-to-end tests build their own model at test time:

- a byte-level BPE tokenizer trained with the ``tokenizers`` library on the small English
  corpus below (vocabulary ``VOCAB_SIZE``; ordinary English text comes out at 3.4 to 4.5
  characters per token), with special tokens and a chat template;
- a 2-layer Llama (hidden 128, 4 heads of size 32, tied embeddings) with random weights
  drawn from a fixed seed, saved as safetensors in Hugging Face format.

The whole thing is about 3.3 MB and builds in a few seconds (mostly importing transformers).
It generates gibberish, which is all a router test needs: real tokenization, a real paged
KV cache, real prefix caching, real streaming and real ``/metrics``.

Head size matters: vLLM's CPU attention starts with a head size below 32 but dies on the
first request, so keep ``HIDDEN_SIZE / NUM_HEADS >= 32`` (and a multiple of 16).

Builds are cached by content: ``build_tiny_model(dest)`` writes a marker file holding a
hash of every input (parameters, corpus, template, builder version, torch and tokenizers
versions) and returns at once when ``dest`` already holds a build with the same hash. It
builds into a temporary sibling directory and renames it into place, so concurrent
builders (pytest-xdist workers) never see a half-written model.

Run it by hand with ``python tests/e2e/tiny_model.py DEST``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Bump when the build procedure changes in a way the hashed inputs below do not capture.
BUILDER_VERSION = 1

SEED = 1234
VOCAB_SIZE = 8192
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 4  # head size 32: the smallest vLLM's CPU attention serves
NUM_KV_HEADS = 4
MAX_POSITION_EMBEDDINGS = 4096
TORCH_DTYPE = "bfloat16"

MARKER = "deepinfer-tiny-model.json"
SERVED_NAME_HINT = "tiny-llama"

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]

# A plain chat template: one role token, the content, an end token; the generation
# prompt opens an assistant turn. "<|end|>" is an end-of-sequence token as well as "</s>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Common English words (function words, everyday nouns, verbs, adjectives, computing terms)
# followed by prose in several registers. Only used to train the tokenizer.
_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have
this from or had by hot word but what some we can out other were all there when up use
your how said an each she which do their time if will way about many then them write
would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round
man year came show every good me give our under name very through just form sentence
great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large
spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth
father head stand own page should country found answer school grow study still learn
plant cover food sun four between state keep eye never last let thought city tree cross
farm hard start might story saw far sea draw left late run while press close night real
life few north open seem together next white children begin got walk example ease paper
group always music those both mark often letter until mile river car feet care second
book carry took science eat room friend began idea fish mountain stop once base hear
horse cut sure watch color face wood main enough plain girl usual young ready above ever
red list though feel talk bird soon body dog family direct pose leave song measure door
product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast
verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern
pull cold notice voice unit power town fine certain fly fall lead cry dark machine note
wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green quick develop ocean warm free minute strong
special mind behind clear tail produce fact street inch multiply nothing course stay
wheel full force blue object decide surface deep moon island foot system busy test record
boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape
equate miss brought heat snow tire bring yes distant fill east paint language among
grand ball yet wave drop heart present heavy dance engine position arm wide sail material
size vary settle speak weight general ice matter circle pair include divide syllable felt
perhaps pick sudden count square reason length represent art subject region energy hunt
probable bed brother egg ride cell believe fraction forest sit race window store summer
train sleep prove lone exercise wall catch mount wish sky board joy winter sat written
wild instrument kept glass grass cow job edge sign visit past soft fun bright gas weather
month million bear finish happy hope flower clothe strange gone jump baby eight village
meet root buy raise solve metal whether push seven paragraph third shall held hair
describe cook floor either result burn hill safe cat century consider type law bit coast
copy phrase silent tall sand soil roll temperature finger industry value fight lie beat
excite natural view sense ear else quite broke case middle kill son lake moment scale
loud spring observe child straight consonant nation dictionary milk speed method organ
pay age section dress cloud surprise quiet stone tiny climb cool design poor lot
experiment bottom key iron single stick flat twenty skin smile crease hole trade melody
trip office receive row mouth exact symbol die least trouble shout except wrote seed tone
join suggest clean break lady yard rise bad blow oil blood touch grew cent mix team wire
cost lost brown wear garden equal sent choose fell fit flow fair bank collect save
control decimal gentle woman captain practice separate difficult doctor please protect
noon whose locate ring character insect caught period indicate radio spoke atom human
history effect electric expect crop modern element hit student corner party supply bone
rail imagine provide agree thus capital chair danger fruit rich thick soldier process
operate guess necessary sharp wing create neighbor wash bat rather crowd corn compare poem
string bell depend meat rub tube famous dollar stream fear sight thin triangle planet
hurry chief colony clock mine tie enter major fresh search send yellow gun allow print
dead spot desert suit current lift rose continue block chart hat sell success company
subtract event particular deal swim term opposite wife shoe shoulder spread arrange camp
invent cotton born determine quart nine truck noise level chance gather shop stretch throw
shine property column molecule select wrong gray repeat require broad prepare salt nose
plural anger claim continent oxygen sugar death pretty skill women season solution magnet
silver thank branch match suffix especially fig afraid huge sister steel discuss forward
similar guide experience score apple bought led pitch coat mass card band rope slip win
dream evening condition feed tool total basic smell valley nor double seat arrive master
track parent shore division sheet substance favor connect post spend chord fat glad
original share station dad bread charge proper bar offer segment slave duck instant market
degree populate chick dear enemy reply drink occur support speech nature range steam
motion path liquid log meant quotient teeth shell neck computer software server request
response network cache memory token model engine router prompt latency throughput
request queue cluster service client user assistant message question answer data file
document database query index value function method class object string integer list
array error timeout retry health metric counter gauge histogram label scrape monitor
deploy release version update install configure default option setting parameter
performance benchmark measure average median percentile second millisecond minute hour
"""

# More general vocabulary (news, essays, everyday requests).
_MORE_WORDS = """
about above across action activity actually add address administration admit adult affect
after again against agency agent ago agree agreement ahead air allow almost alone along
already although always american among amount analysis animal another answer anyone
anything appear apply approach area argue around arrive article artist assume attack
attention attorney audience author authority available avoid away baby bag ball bank bar
beat beautiful because become before begin behavior behind believe benefit beyond bill
billion born both budget building business buy call camera campaign cancer candidate
card care career carry case catch cause cell central century certainly chair challenge
chance change character charge check choice church citizen civil claim clearly close
coach collection college come commercial common community compare computer concern
conference congress consider consumer contain continue control cost could country
couple course court cover create crime cultural culture cup current customer cut dark
daughter dead deal death debate decade decision defense degree democrat democratic
describe despite detail determine develop development die difference different
difficult dinner direction director discover discussion disease doctor dog draw dream
drive drop drug during each early east easy eat economic economy edge education effect
effort eight either election else employee energy enjoy enough enter entire environment
environmental especially establish even evening event ever every everybody everyone
everything evidence exactly example executive exist expect experience expert explain
eye face fact factor fail fall family far fast father fear federal feel feeling few
field fight figure fill film final finally financial find fine finger finish fire firm
first fish five floor fly focus follow food foot force foreign forget former forward
four free friend from front full fund future game garden gas general generation girl
give glass goal good government great green ground group grow growth guess gun guy
hair half hand hang happen happy hard have head health hear heart heat heavy help here
herself high himself history hit hold home hope hospital hot hotel hour house however
huge human hundred husband idea identify image imagine impact important improve include
including increase indeed indicate individual industry information inside instead
institution interest interesting international interview into investment involve issue
item itself join just keep kid kill kind kitchen know knowledge land language large last
late later laugh lawyer lay lead leader learn least leave left legal less letter level
lie life light likely line list listen little live local long look lose loss lot love
low machine magazine main maintain major majority make manage management manager many
market marriage material matter maybe mean measure media medical meet meeting member
memory mention message method middle might military million mind minute miss mission
model modern moment money month more morning most mother mouth move movement movie much
music must myself name nation national natural nature near nearly necessary need network
never news newspaper next nice night none nor north note nothing notice number occur
offer office officer official often oil okay old once only onto open operation
opportunity option order organization other others our out outside over own owner page
pain painting paper parent part participant particular particularly partner party pass
past patient pattern pay peace people per perform performance perhaps period person
personal phone physical pick picture piece place plan plant play player point police
policy political politics poor popular population position positive possible power
practice prepare present president pressure pretty prevent price private probably
problem process produce product production professional professor program project
property protect prove provide public pull purpose push put quality question quickly
quite race radio raise range rate rather reach read ready real reality realize really
reason receive recent recently recognize record red reduce reflect region relate
relationship religious remain remember remove report represent republican require
research resource respond response responsibility rest result return reveal rich right
rise risk road rock role room rule run safe same save say scene school science
scientist score sea season seat second section security see seek seem sell send senior
sense series serious serve service set seven several shake share she shoot short shot
should shoulder show side sign significant similar simple simply since sing single
sister sit site situation six size skill skin small smile social society soldier some
somebody someone something sometimes son song soon sort sound source south southern
space speak special specific speech spend sport spring staff stage stand standard star
start state statement station stay step still stock stop store story strategy street
strong structure student study stuff style subject success successful such suddenly
suffer suggest summer support sure surface system table take talk task tax teach teacher
team technology television tell ten tend term test than thank that their them
themselves then theory there these they thing think third this those though thought
thousand threat three through throughout throw thus time today together tonight too top
total tough toward town trade traditional training travel treat treatment tree trial
trip trouble true truth try turn type under understand unit until upon usually value
various very victim view violence visit voice vote wait walk wall want war watch water
way weapon wear week weight well west western what whatever when where whether which
while white who whole whom whose why wide wife will win wind window wish with within
without woman wonder word work worker world worry would write writer wrong yard yeah
year yes yet you young your yourself hello thanks please sorry explain summarize
describe translate question answer example simple short long yesterday tomorrow today
weekend holiday breakfast lunch dinner coffee tea bread cheese chicken vegetable fruit
kitchen bedroom bathroom office building hospital airport station library museum
restaurant bakery market village city country mountain river forest beach island
weather rain snow wind cloud storm sunshine autumn spring summer winter january
february march april may june july august september october november december monday
tuesday wednesday thursday friday saturday sunday morning afternoon evening midnight
biology chemistry physics mathematics history geography literature philosophy economics
photosynthesis energy oxygen carbon electricity planet universe galaxy climate ocean
report committee quarterly financial expansion warehouse interest rates postpone
leaves color colour essay appreciate
"""

_PROSE = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. It was the best of times, it was the worst of times, it was the age of
wisdom, it was the age of foolishness.

Once upon a time, in a small village at the edge of a great forest, there lived an old
woman and her grandson. Every morning the boy walked to the river to fetch water, and
every evening he told his grandmother what he had seen: the birds that sang in the trees,
the fish that jumped in the stream, and the strangers who passed along the road to the
city. One day he came home late, and his face was pale. "I saw a light in the forest,"
he said, "and I heard someone calling my name."

Machine learning models are trained on large collections of text. During training, the
model learns to predict the next word in a sentence, and over many examples it builds an
internal representation of language. Serving such a model efficiently is a different
problem: each request must be scheduled, its prompt must be processed, and the generated
tokens must be streamed back to the client as quickly as possible.

A language model server keeps the keys and values of previous tokens in a cache, so that
it does not have to recompute them for every new token. When two requests share the same
beginning, for example the same system prompt or the same long document, the server can
reuse the cached blocks of the first request for the second one. This is called prefix
caching, and it can reduce the time to the first token by a large factor.

The router sits in front of many engines. For every incoming request it estimates which
engine is most likely to already hold the prompt prefix in its cache, and it balances
that estimate against the current load of each engine, so that no single engine becomes
overloaded while the others are idle.

Please summarize the following article in three sentences. Explain the main argument,
list the evidence the author gives, and say whether you find it convincing. Write your
answer in plain English and avoid technical jargon where possible.

The weather today will be mostly sunny with a few clouds in the afternoon. Temperatures
will reach twenty two degrees in the city and slightly less near the coast. Tomorrow
there is a chance of rain in the north, and the wind will turn to the west.

Good morning! How are you today? I would like to book a table for four people on Friday
evening, if that is possible. We will arrive at about seven o'clock. Thank you very much
for your help, and have a nice day.

In 1969, two astronauts walked on the surface of the Moon while a third orbited above.
Millions of people around the world watched the landing on television. The mission
showed what careful planning, engineering and courage could achieve together.

def handle_request(request):
    response = router.forward(request, timeout=30)
    return response.json()

Error: connection refused (errno 111). Retrying in 2 seconds... Request id 4f9a-21bc
finished with status 200 after 153 ms; 512 prompt tokens, 64 completion tokens.
"""


def _inflect(word: str) -> list[str]:
    """The word and naive inflections (-s, -ing, -ed, -er, -ly): teaches BPE the suffixes."""
    if len(word) < 3:
        return [word]
    stem = word[:-1] if word.endswith("e") else word
    return [word, word + "s", stem + "ing", stem + "ed", word + "er", word + "ly"]


def corpus() -> list[str]:
    """The training corpus, as a list of lines (deterministic)."""
    lines = [line for line in _PROSE.splitlines() if line.strip()]
    words = _WORDS.split() + _MORE_WORDS.split()
    # Words on their own (lower case, capitalised, inflected), so that common words become
    # one token each, as in a real English vocabulary.
    forms = [form for w in words for form in _inflect(w)]
    for seq in (words, [w.capitalize() for w in words], forms):
        lines += [" ".join(seq[i : i + 16]) for i in range(0, len(seq), 16)]
    lines += [f"{i} {i * 7} {i * 13}.5" for i in range(200)]
    return lines


def _inputs_hash() -> str:
    import tokenizers
    import torch

    spec = {
        "builder": BUILDER_VERSION,
        "seed": SEED,
        "vocab": VOCAB_SIZE,
        "hidden": HIDDEN_SIZE,
        "intermediate": INTERMEDIATE_SIZE,
        "layers": NUM_LAYERS,
        "heads": NUM_HEADS,
        "kv_heads": NUM_KV_HEADS,
        "max_pos": MAX_POSITION_EMBEDDINGS,
        "dtype": TORCH_DTYPE,
        "special": SPECIAL_TOKENS,
        "template": CHAT_TEMPLATE,
        "corpus": corpus(),
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
    }
    blob = json.dumps(spec, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_built(dest: Path, key: str) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("hash") == key and (dest / "model.safetensors").is_file()


def _train_tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def build_tokenizer(out: Path):  # -> tokenizers.Tokenizer
    """Train the byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory
    (tokenizer.json, tokenizer_config.json, chat_template.jinja); no torch needed."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    return tok


def _build(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out)

    vocab = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOS], ids["<|end|>"]],
        pad_token_id=ids[PAD],
        initializer_range=0.02,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(getattr(torch, TORCH_DTYPE))
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.eos_token_id = [ids[EOS], ids["<|end|>"]]
    model.generation_config.pad_token_id = ids[PAD]
    model.save_pretrained(out, safe_serialization=True)


# Built models are cached by content hash, so reusing one across runs is safe.
MODEL_CACHE = Path(os.environ.get("DEEPINFER_E2E_CACHE",
                                  Path.home() / ".cache" / "deepinfer-e2e")) / "tiny-llama"


def build_tiny_model(dest: Path) -> Path:
    """Build (or reuse) the tiny model in directory ``dest`` and return ``dest``.

    ``dest`` is then a Hugging Face model directory (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json with the chat template, generation_config.json)
    that ``vllm ... --model dest`` serves, and that ``vllm bench serve --tokenizer dest``
    uses offline. The served model name defaults to the path; pass
    ``--served-model-name`` to get a short one.
    """
    dest = Path(dest).resolve()
    key = _inputs_hash()
    if _is_built(dest, key):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
    try:
        _build(tmp)
        (tmp / MARKER).write_text(json.dumps({"hash": key, "builder": BUILDER_VERSION}) + "\n")
        if dest.exists() and not _is_built(dest, key):
            stale = dest.with_name(f".{dest.name}.stale-{os.getpid()}")
            try:
                dest.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass  # someone else moved it first
        try:
            tmp.rename(dest)
        except OSError:
            # A concurrent builder won the race; its build has the same inputs.
            if not _is_built(dest, key):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dest.chmod(0o755)  # mkdtemp made it 0700
    return dest


if __name__ == "__main__":
    import time

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/deepinfer-tiny-model")
    t0 = time.perf_counter()
    path = build_tiny_model(target)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"{path} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
