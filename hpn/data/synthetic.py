"""The built-in persona corpus: PersonaHub-like descriptions, generated from a seed.

Nothing can be downloaded where the demo and tests run, so this is the default data. It is
made hard on purpose, so that tuning matters: Zipf-like class sizes, related domains that
share words, about 15% of personas mixing two domains (labelled by the main one), some
personas with no job title at all, and a `noise` fraction of labels flipped.
"""

from __future__ import annotations

import random
import re
import string

import numpy as np

from hpn.data.corpus import MIN_CLASS_SIZE, Corpus
from hpn.errors import DataError

MIX_FRACTION = 0.15  # personas that borrow vocabulary from a second domain
ZIPF_EXPONENT = 0.6  # 14 classes: the largest is ~14**0.6 = 4.9x the smallest

# Vocabulary reads better packed than one word a line.
# fmt: off
# domain -> (roles, topics, activities, tools). Activities read after "who".
DOMAINS: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "medicine": (
        [
            "pediatric nurse", "family physician", "surgeon", "paramedic", "pharmacist",
            "radiologist", "midwife", "cardiologist", "nurse practitioner", "emergency doctor",
        ],
        [
            "telemedicine", "antibiotic resistance", "vaccine uptake", "chronic pain",
            "patient safety", "rare genetic disorders", "maternal health", "palliative care",
            "hospital staffing", "public health",
        ],
        [
            "volunteers at a rural clinic", "works night shifts in an emergency ward",
            "mentors first-year medical residents", "runs free blood pressure screenings",
            "organises vaccination drives", "cares for elderly patients at home",
            "studies clinical trial results", "trains volunteers in first aid",
        ],
        [
            "stethoscopes", "electronic health records", "ultrasound machines",
            "diagnostic guidelines", "infusion pumps", "medical charts", "triage protocols",
            "prescription software",
        ],
    ),
    "law": (
        [
            "defense attorney", "paralegal", "family lawyer", "public prosecutor", "judge",
            "immigration lawyer", "legal scholar", "notary", "corporate counsel", "mediator",
        ],
        [
            "tenant rights", "intellectual property", "criminal justice reform", "contract law",
            "asylum cases", "data privacy regulation", "constitutional law", "labour disputes",
            "wrongful convictions", "international arbitration",
        ],
        [
            "offers pro bono legal advice", "drafts contracts for small businesses",
            "argues appeals in court", "mediates neighbourhood disputes",
            "teaches a night class on civil rights", "reviews case files late into the evening",
            "advocates for juvenile defendants", "writes amicus briefs",
        ],
        [
            "case law databases", "court transcripts", "legal briefs", "statutes",
            "deposition notes", "contract templates", "evidence binders", "precedent archives",
        ],
    ),
    "software": (
        [
            "backend developer", "software engineer", "data scientist", "mobile app developer",
            "DevOps engineer", "game programmer", "open-source maintainer", "web developer",
            "machine learning engineer", "security analyst",
        ],
        [
            "distributed systems", "open-source licensing", "cybersecurity",
            "functional programming", "cloud computing", "large language models",
            "accessibility on the web", "database performance", "code review culture",
            "algorithmic fairness",
        ],
        [
            "contributes to open-source libraries", "debugs production outages at night",
            "builds side projects on weekends", "teaches kids to code",
            "writes technical tutorials", "refactors legacy codebases", "competes in hackathons",
            "automates everything with scripts",
        ],
        [
            "Python", "Kubernetes clusters", "version control", "Linux terminals", "Rust",
            "continuous integration pipelines", "JavaScript frameworks", "SQL databases",
        ],
    ),
    "finance": (
        [
            "financial analyst", "accountant", "investment banker", "tax advisor", "actuary",
            "credit risk officer", "portfolio manager", "auditor", "stock trader",
            "financial planner",
        ],
        [
            "retirement savings", "cryptocurrency markets", "inflation", "microfinance",
            "corporate earnings", "tax policy", "household budgeting", "interest rates",
            "sustainable investing", "insurance pricing",
        ],
        [
            "prepares tax returns for neighbours", "tracks the stock market every morning",
            "advises families on their savings", "audits the books of local charities",
            "builds spreadsheet models of company valuations", "manages a small hedge fund",
            "teaches budgeting workshops", "reads quarterly reports for fun",
        ],
        [
            "spreadsheets", "Bloomberg terminals", "balance sheets", "accounting software",
            "risk models", "ledgers", "pension calculators", "trading platforms",
        ],
    ),
    "education": (
        [
            "primary school teacher", "high school teacher", "school principal",
            "special education teacher", "university lecturer", "tutor", "curriculum designer",
            "kindergarten teacher", "school counsellor", "adult literacy instructor",
        ],
        [
            "early childhood literacy", "classroom management", "inclusive education",
            "standardised testing", "homeschooling", "student motivation", "lesson planning",
            "bilingual education", "education policy", "remote learning",
        ],
        [
            "grades homework late into the night", "runs an after-school reading club",
            "designs lesson plans for mixed-ability classes", "coaches students for exams",
            "organises parent-teacher meetings", "mentors new teachers",
            "volunteers at an adult literacy programme", "chaperones school field trips",
        ],
        [
            "whiteboards", "lesson plans", "textbooks", "learning management systems",
            "flashcards", "report cards", "classroom projectors", "reading primers",
        ],
    ),
    "agriculture": (
        [
            "dairy farmer", "agronomist", "beekeeper", "organic grower", "rancher",
            "vineyard owner", "soil scientist", "orchard keeper", "crop consultant",
            "poultry farmer",
        ],
        [
            "crop rotation", "soil health", "drought-resistant seeds", "sustainable farming",
            "livestock welfare", "irrigation", "pollinator decline", "farm subsidies",
            "heirloom vegetables", "food security",
        ],
        [
            "raises heritage sheep", "sells produce at the farmers market",
            "experiments with cover crops", "tends a family orchard", "keeps beehives",
            "manages a cooperative grain silo", "rotates cattle between pastures",
            "grows vegetables in a community garden",
        ],
        [
            "tractors", "irrigation pipes", "seed drills", "greenhouses", "compost heaps",
            "milking machines", "fertiliser spreaders", "grain silos",
        ],
    ),
    "arts": (
        [
            "painter", "sculptor", "illustrator", "art curator", "ceramicist", "muralist",
            "photographer", "printmaker", "gallery owner", "art restorer",
        ],
        [
            "abstract expressionism", "street art", "Renaissance portraiture", "colour theory",
            "art therapy", "contemporary sculpture", "graphic novels", "art-world funding",
            "folk crafts", "digital art",
        ],
        [
            "paints murals in public spaces", "exhibits work at local galleries",
            "teaches watercolour workshops", "restores old oil paintings",
            "sketches strangers in cafés", "curates exhibitions of emerging artists",
            "throws pottery in a shared studio", "photographs abandoned buildings",
        ],
        [
            "oil paints", "sketchbooks", "pottery wheels", "easels", "charcoal", "kilns",
            "film cameras", "printing presses",
        ],
    ),
    "sports": (
        [
            "football coach", "marathon runner", "personal trainer", "swimming instructor",
            "sports physiotherapist", "basketball player", "cycling enthusiast", "referee",
            "tennis coach", "rock climber",
        ],
        [
            "endurance training", "sports nutrition", "injury prevention", "youth leagues",
            "team tactics", "Olympic history", "strength and conditioning", "doping scandals",
            "women's football", "recovery routines",
        ],
        [
            "trains for ultramarathons", "coaches a youth football team",
            "runs bootcamp classes in the park", "referees amateur matches on Sundays",
            "swims laps every morning", "analyses game footage",
            "organises charity cycling rides", "climbs at the local bouldering gym",
        ],
        [
            "stopwatches", "heart rate monitors", "training plans", "kettlebells", "racing bikes",
            "climbing ropes", "rowing machines", "match statistics",
        ],
    ),
    "journalism": (
        [
            "investigative journalist", "news editor", "foreign correspondent", "podcast host",
            "fact-checker", "sports reporter", "photojournalist", "columnist", "radio presenter",
            "local news reporter",
        ],
        [
            "press freedom", "misinformation", "local politics", "data journalism",
            "media ethics", "war reporting", "public broadcasting", "election coverage",
            "whistleblower protection", "the future of newspapers",
        ],
        [
            "chases leads for a local newspaper", "hosts a weekly current-affairs podcast",
            "fact-checks political speeches", "interviews city council members",
            "writes opinion columns", "covers protests with a camera",
            "edits breaking news stories", "files reports from conflict zones",
        ],
        [
            "voice recorders", "press passes", "notebooks full of interview notes",
            "newsroom deadlines", "public records requests", "editing software", "wire services",
            "broadcast microphones",
        ],
    ),
    "environment": (
        [
            "climate scientist", "conservation biologist", "park ranger",
            "environmental activist", "marine biologist", "wildlife ecologist",
            "recycling coordinator", "renewable energy advocate", "forester",
            "environmental consultant",
        ],
        [
            "climate change", "ocean plastic", "biodiversity loss", "renewable energy",
            "deforestation", "carbon emissions", "wetland restoration", "endangered species",
            "air pollution", "urban green spaces",
        ],
        [
            "leads beach clean-ups", "monitors bird populations", "plants trees with volunteers",
            "campaigns against new coal plants", "counts coral on reef surveys",
            "guides hikes through protected forests", "tracks wolves with radio collars",
            "runs a neighbourhood recycling drive",
        ],
        [
            "water sampling kits", "satellite imagery", "camera traps", "solar panels",
            "field guides", "air quality sensors", "GPS collars", "compost bins",
        ],
    ),
    "engineering": (
        [
            "civil engineer", "mechanical engineer", "electrical engineer", "structural engineer",
            "aerospace engineer", "robotics engineer", "chemical engineer", "site engineer",
            "process engineer", "industrial designer",
        ],
        [
            "bridge safety", "electric vehicles", "3D printing", "power grid resilience",
            "manufacturing automation", "earthquake-resistant buildings", "jet propulsion",
            "materials fatigue", "water infrastructure", "drones",
        ],
        [
            "inspects bridges after storms", "designs wind turbine blades",
            "builds robots with students", "tests prototypes in a machine shop",
            "supervises construction sites", "tinkers with old motorcycles",
            "calculates loads for high-rise buildings", "repairs circuit boards",
        ],
        [
            "CAD software", "oscilloscopes", "soldering irons", "lathes", "load calculations",
            "blueprints", "finite element models", "welding torches",
        ],
    ),
    "hospitality": (
        [
            "hotel manager", "head chef", "sommelier", "barista", "event planner", "concierge",
            "restaurant owner", "pastry chef", "tour guide", "bed-and-breakfast host",
        ],
        [
            "fine dining", "customer service", "wine pairing", "food tourism", "hotel design",
            "restaurant reviews", "street food", "coffee roasting", "event logistics",
            "guest experience",
        ],
        [
            "runs a small seaside guesthouse", "plans weddings for large families",
            "bakes sourdough before dawn", "leads food tours of the old town",
            "trains new waiting staff", "experiments with fusion recipes", "hosts wine tastings",
            "manages a busy hotel front desk",
        ],
        [
            "espresso machines", "booking systems", "chef's knives", "seating charts",
            "wine cellars", "menu cards", "guest reviews", "cast-iron pans",
        ],
    ),
    "history": (
        [
            "historian", "archivist", "museum curator", "archaeologist", "genealogist",
            "history teacher", "heritage conservator", "medievalist", "local history buff",
            "military historian",
        ],
        [
            "the Roman Empire", "the Industrial Revolution", "colonial trade routes",
            "medieval manuscripts", "the Cold War", "ancient Egypt", "oral histories",
            "the Ottoman Empire", "family genealogy", "historic architecture",
        ],
        [
            "digs at excavation sites", "catalogues letters in a city archive",
            "gives walking tours of historic districts", "transcribes old diaries",
            "restores antique maps", "traces family trees for neighbours",
            "reenacts battles at heritage festivals", "records interviews with war veterans",
        ],
        [
            "archival records", "microfilm readers", "old maps", "parish registers",
            "museum catalogues", "excavation trowels", "primary sources", "census records",
        ],
    ),
    "psychology": (
        [
            "clinical psychologist", "therapist", "school psychologist", "psychiatrist",
            "behavioural scientist", "counsellor", "neuropsychologist", "social worker",
            "life coach", "grief counsellor",
        ],
        [
            "anxiety disorders", "cognitive behavioural therapy", "child development",
            "mindfulness", "trauma recovery", "addiction", "memory and ageing",
            "workplace burnout", "attachment theory", "sleep and mood",
        ],
        [
            "runs group therapy sessions", "listens to callers on a crisis hotline",
            "studies how teenagers form habits", "supports veterans with PTSD",
            "leads mindfulness workshops", "counsels couples through conflict",
            "designs experiments on decision making", "volunteers with refugee families",
        ],
        [
            "personality assessments", "therapy notes", "behavioural surveys",
            "journaling prompts", "EEG headsets", "diagnostic manuals", "session recordings",
            "mood trackers",
        ],
    ),
}

# Domains that share words and readers: a mixed persona borrows from a neighbour more often.
NEIGHBOURS = {
    "medicine": "psychology", "psychology": "medicine", "software": "engineering",
    "engineering": "software", "finance": "law", "law": "finance", "journalism": "arts",
    "arts": "journalism", "environment": "agriculture", "agriculture": "environment",
    "history": "education", "education": "history", "hospitality": "sports",
    "sports": "hospitality",
}

ADJECTIVES = [
    "retired", "young", "ambitious", "semi-retired", "mid-career", "self-taught", "veteran",
    "newly qualified", "bilingual", "soft-spoken", "energetic", "introverted", "outspoken",
    "meticulous", "experienced", "part-time",
]
PLACES = [
    "in a small coastal town", "from Nairobi", "based in Lyon", "in rural Montana",
    "in a busy capital city", "from São Paulo", "living in Osaka", "in a mountain village",
    "from a fishing community", "in suburban Melbourne", "based in Toronto",
    "from the Scottish Highlands", "in a university town", "living abroad",
]
HOBBIES = [
    "loves crossword puzzles", "is raising two teenagers", "grew up on a small island",
    "speaks three languages", "recently moved abroad", "walks the dog every evening",
    "collects vintage postcards", "plays chess online", "enjoys long train journeys",
    "sings in a community choir",
]

# Slots: role, role2, topic, topic2, activity, activity2, tool (domain) and adj, place, hobby.
TEMPLATES = [
    "A {adj} {role} who {activity} and is curious about {topic}.",
    "A {role} {place} who {activity}.",
    "An experienced {role} interested in {topic} and {topic2}.",
    "A {role} who relies on {tool} every day and {activity}.",
    "Someone {place} who {activity} and reads everything about {topic}.",
    "A {role} fascinated by {topic}, who {hobby}.",
    "A {adj} professional who {activity} and {activity2}.",
    "A person {place} who spends most days working with {tool} and thinking about {topic}.",
    "A former {role} who now {activity}.",
    "A {role} and part-time {role2} with strong opinions on {topic}.",
    "A {adj} {role} who {hobby} and keeps up with research on {topic}.",
    "A community member {place} who {activity} and is learning about {topic}.",
    "An aspiring {role} who {activity} in their spare time.",
    "A {role} {place} whose work centres on {topic} and {tool}.",
    "A {adj} person who {hobby}, {activity} and often debates {topic}.",
    # Weak signal: one domain word among generic ones.
    "Someone {place} who {hobby} and is curious about {topic}.",
    "A {adj} neighbour who {hobby} and sometimes talks about {tool}.",
    "A retiree {place} who follows the news about {topic}.",
]
DOMAIN_SLOTS = {
    "role": 0, "role2": 0, "topic": 1, "topic2": 1, "activity": 2, "activity2": 2, "tool": 3,
}
# fmt: on

# -- the numeric attribute (target=True): an age, written in several ways -------------------
AGE_RANGE = (19, 85)
AGE_SPREAD = 11.0  # standard deviation around the persona's expected age
# Mean age per domain: a weak signal of its own (history buffs skew older, athletes younger).
DOMAIN_AGE = {
    "medicine": 44, "law": 46, "software": 34, "finance": 42, "education": 45,
    "agriculture": 52, "arts": 41, "sports": 31, "journalism": 39, "environment": 36,
    "engineering": 42, "hospitality": 35, "history": 55, "psychology": 45,
}
# Words the persona text already has that imply an age; checked in order, the first wins,
# so a "retired" adjective is not contradicted by a young age too often.
AGE_CUES: tuple[tuple[str, float], ...] = (
    ("semi-retired", 64), ("retiree", 70), ("retired", 70), ("newly qualified", 27),
    ("young", 27), ("aspiring", 28), ("mid-career", 42), ("raising two teenagers", 46),
    ("veteran", 55), ("former", 58), ("experienced", 50),
)
# (subject, verb "to be", verb "to have", possessive) for she / he / they.
PRONOUNS = (("she", "is", "has", "her"), ("he", "is", "has", "his"),
            ("they", "are", "have", "their"))
DECADES = {1: "teens", 2: "twenties", 3: "thirties", 4: "forties", 5: "fifties",
           6: "sixties", 7: "seventies", 8: "eighties"}
# (oldest age of the stage, phrasings); {s}/{be}/{have}/{poss} from PRONOUNS.
LIFE_STAGES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (24, ("{S} {be} a recent graduate.", "{S} only finished university last year.",
          "{S} {be} just starting out in working life.")),
    (33, ("{S} {be} early in {poss} career.", "{S} {be} still finding {poss} feet at work.",
          "{S} recently rented {poss} first flat with friends.")),
    (47, ("{S} {be} in the middle of {poss} career.", "{S} {be} juggling work and school runs.",
          "{S} {have} a mortgage and two kids in primary school.")),
    (59, ("{S} {have} decades of work behind {obj}.", "{S} {have} grown-up children.",
          "{S} {be} a seasoned hand with a long career behind {obj}.")),
    (66, ("{S} {be} nearing retirement.", "{S} {be} planning to retire in a few years.",
          "{S} {be} counting the years to {poss} pension.")),
    (200, ("{S} {be} long retired.", "{S} {be} retired and dotes on {poss} grandchildren.",
           "{S} {have} been drawing a pension for years.")),
)
# How an age is written, with weights: digits, a decade, a life stage, years of work.
AGE_FORMS = (("number", 0.3), ("decade", 0.3), ("stage", 0.25), ("experience", 0.15))
SECOND_AGE_FORM = 0.5  # the share of personas whose age is written a second, other way


def _expected_age(text: str, domain: str) -> float:
    lowered = text.lower()
    for cue, age in AGE_CUES:
        if cue in lowered:
            return age
    return DOMAIN_AGE[domain]


def _decade_phrase(age: int) -> str:
    part = "early" if age % 10 <= 3 else "mid" if age % 10 <= 6 else "late"
    return f"{part} {DECADES[age // 10]}"


def _age_phrase(rng: random.Random, form: str, age: int, fill: dict[str, str]) -> str:
    """One sentence saying `age` in the way `form` (AGE_FORMS) names."""
    if form == "number":
        sentence = rng.choice(("{S} {be} {age} years old.", "Aged {age}.",
                               "{S} turned {age} this year."))
    elif form == "decade":
        sentence = rng.choice(("{S} {be} in {poss} {decade}.", "In {poss} {decade}.",
                               "{S} {be} somewhere in {poss} {decade}."))
    elif form == "stage":
        sentence = rng.choice(next(p for top, p in LIFE_STAGES if age <= top))
    else:  # years of work: age less a career start around 22
        years = max(2, age - rng.randint(19, 26))
        sentence = rng.choice(("{S} {have} {years} years of work experience.",
                               "{S} {have} been working for {years} years."))
        fill = {**fill, "years": str(years)}
    return sentence.format(age=age, decade=_decade_phrase(age), **fill)


def _age_sentence(rng: random.Random, text: str, age: int) -> str:
    """`text` with its age written into it: one way of AGE_FORMS, sometimes two (a persona
    text is long and the age phrase short; a second phrase keeps the signal readable)."""
    subject, be, have, poss = rng.choice(PRONOUNS)
    obj = {"she": "her", "he": "him", "they": "them"}[subject]
    fill = {"S": subject.capitalize(), "be": be, "have": have, "poss": poss, "obj": obj}
    names, weights = [f for f, _ in AGE_FORMS], [w for _, w in AGE_FORMS]
    forms = rng.choices(names, weights=weights)
    if rng.random() < SECOND_AGE_FORM:
        rest = [i for i, f in enumerate(names) if f != forms[0]]
        forms += rng.choices([names[i] for i in rest], weights=[weights[i] for i in rest])
    for form in forms:
        lead = re.match(r"An? ", text)
        if form == "number" and lead and rng.random() < 0.5:  # "A 47-year-old surgeon ..."
            article = "An" if str(age).startswith("8") or age in (11, 18) else "A"
            text = f"{article} {age}-year-old {text[lead.end():]}"
        else:
            text = f"{text} {_age_phrase(rng, form, age, fill)}"
    return text


def with_ages(texts: list[str], domains: list[str], seed: int) -> tuple[list[str], list[int]]:
    """An age per persona, drawn around what its domain and words suggest, and the texts with
    that age written in. Its own random stream (`attribute-{seed}`), so the main stream,
    and with it every text and label of `target=False`, is untouched."""
    rng = random.Random(f"attribute-{seed}")
    low, high = AGE_RANGE
    out, ages = [], []
    for text, domain in zip(texts, domains):
        age = round(min(high, max(low, rng.gauss(_expected_age(text, domain), AGE_SPREAD))))
        ages.append(age)
        out.append(_age_sentence(rng, text, age))
    return out, ages


_ARTICLE = re.compile(r"\b([Aa]) (?=[aeioAEIO])")  # not "u": "a university"
_SLOTS_USED = {t: {f for _, f, _, _ in string.Formatter().parse(t) if f} for t in TEMPLATES}


def class_sizes(size: int, num_classes: int, rng: random.Random) -> list[int]:
    """Zipf-like sizes summing to `size`, each >= 3, the largest class placed by the seed."""
    weights = np.arange(1, num_classes + 1, dtype=float) ** -ZIPF_EXPONENT
    spare = size - MIN_CLASS_SIZE * num_classes
    sizes = MIN_CLASS_SIZE + np.floor(spare * weights / weights.sum()).astype(int)
    sizes[0] += size - sizes.sum()  # the rounding remainder goes to the largest class
    order = list(range(num_classes))
    rng.shuffle(order)
    return [int(sizes[order.index(c)]) for c in range(num_classes)]


def _persona(rng: random.Random, main: str, names: list[str]) -> tuple[str, str | None]:
    """A persona text, and the second domain its text really borrows words from (None when
    it is unmixed, or its template uses none of the borrowed slots)."""
    domains = {slot: main for slot in DOMAIN_SLOTS}
    if rng.random() < MIX_FRACTION:
        other = NEIGHBOURS[main] if rng.random() < 0.7 else rng.choice(names)
        while other == main:
            other = rng.choice(names)
        for slot in DOMAIN_SLOTS:
            if rng.random() < 0.5:
                domains[slot] = other
    values = {slot: rng.choice(DOMAINS[d][DOMAIN_SLOTS[slot]]) for slot, d in domains.items()}
    values.update(adj=rng.choice(ADJECTIVES), place=rng.choice(PLACES), hobby=rng.choice(HOBBIES))
    template = rng.choice(TEMPLATES)
    borrowed = {domains[slot] for slot in _SLOTS_USED[template] if slot in domains} - {main}
    return _ARTICLE.sub(r"\1n ", template.format(**values)), next(iter(borrowed), None)


def synthetic_corpus(size: int, seed: int = 0, noise: float = 0.05, target: bool = False) -> Corpus:
    """`size` persona descriptions over 14 domains, deterministic for a seed.

    Labels are the main domain; label sets add the domain a mixed persona borrows words
    from (multilabel). `target=True` also gives each persona an age, written into its text
    (`with_age`); the age has its own random stream, so texts and labels otherwise stay
    exactly those of `target=False`, and so of every study run before targets existed.
    """
    names = list(DOMAINS)
    if size < MIN_CLASS_SIZE * len(names):
        raise DataError(
            f"data.size={size}: the synthetic corpus needs >= {MIN_CLASS_SIZE * len(names)} texts"
        )
    if not 0 <= noise < 1:
        raise DataError(f"data.noise={noise}: must lie in [0, 1)")
    rng = random.Random(seed)
    labels = [c for c, n in enumerate(class_sizes(size, len(names), rng)) for _ in range(n)]
    rng.shuffle(labels)
    personas = [_persona(rng, names[c], names) for c in labels]
    texts = [text for text, _ in personas]
    domains = [names[c] for c in labels]  # the domain each text is written in, before noise

    # Label noise: flip to another class, but never shrink a class below what a split needs.
    counts = np.bincount(labels, minlength=len(names))
    for i in rng.sample(range(size), round(noise * size)):
        if counts[labels[i]] > MIN_CLASS_SIZE:
            new = rng.choice([c for c in range(len(names)) if c != labels[i]])
            counts[labels[i]] -= 1
            counts[new] += 1
            labels[i] = new
    index = {name: c for c, name in enumerate(names)}
    label_sets = np.zeros((size, len(names)), dtype=np.bool_)
    label_sets[np.arange(size), labels] = True
    for i, (_, borrowed) in enumerate(personas):
        if borrowed is not None:
            label_sets[i, index[borrowed]] = True
    targets = None
    if target:
        texts, ages = with_ages(texts, domains, seed)
        targets = np.array(ages, dtype=np.float64)
    return Corpus(texts, np.array(labels, dtype=np.int64), names, targets=targets,
                  label_sets=label_sets)
