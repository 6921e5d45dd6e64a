"""Kiln's own short-sentence topic corpus: four topics, generated from word lists in this file.

Origin and licence: every phrase below was written for Kiln and is distributed with it under the
project's Apache-2.0 licence; no text was copied from another corpus. Sentences are built by
filling topic-neutral frames ("I read that {agent} {action} {context}.") with a topic's agent,
action and context phrases, drawn with a seeded :class:`random.Random`, so the same seed gives
the same sentences on every machine and Python version.

Why it is built this way: the frame words are shared by all topics and carry no label, and each
topic has about 30 agents, 40 actions and 20 contexts with little repeated vocabulary. A model
that sees only a few labelled sentences per topic has therefore seen few of the content words
of a test sentence: a bag-of-words model has little to go on, while a pretrained sentence
encoder already knows that "drizzle" is weather and "goalkeeper" is sport. That gap is what a
transfer-learning comparison needs to show.

Example:
    >>> rows = topic_sentences(per_topic=2, seed=0)
    >>> len(rows), sorted({label for label, _ in rows})
    (8, ['food', 'sports', 'technology', 'weather'])
"""

from __future__ import annotations

import random

__all__ = ["TOPICS", "topic_sentences"]

#: Frames shared by every topic; ``{a}`` agent, ``{x}`` action, ``{c}`` context.
_FRAMES: tuple[str, ...] = (
    "{A} {x} {c}.",
    "I read that {a} {x} {c}.",
    "Apparently {a} {x}.",
    "{C}, {a} {x}.",
    "Yesterday {a} {x}.",
    "According to my neighbour, {a} {x} {c}.",
    "Nobody could believe that {a} {x}.",
    "The news said {a} {x} {c}.",
    "Last week {a} {x}, which surprised everyone.",
    "It turns out {a} {x} {c}.",
    "My friend told me {a} {x}.",
    "Once again {a} {x} {c}.",
)


def _phrases(block: str) -> tuple[str, ...]:
    """Phrases written ``a | b | c`` across lines (compact, and stable under the formatter)."""
    return tuple(p.strip() for p in block.replace("\n", " ").split("|") if p.strip())


_SPORTS = {
    "agents": _phrases(
        """
        the striker | our goalkeeper | the head coach | the young sprinter | the visiting team |
        the team captain | the referee | the rookie pitcher | the veteran boxer |
        the tennis champion | the cycling squad | the defending champions | the home side |
        the point guard | the marathon runner | the swim team | the hockey club | the golfer |
        the quarterback | the midfielder | the wrestler | the relay team | the ski jumper |
        the cricket captain | the underdogs | the league leaders | the fencing coach |
        the volleyball squad | the rugby fullback | the figure skater
        """
    ),
    "actions": _phrases(
        """
        scored twice in the second half | missed a penalty kick | broke the national record |
        was sent off for a reckless tackle | won the championship final | lost on a tiebreak |
        hit a home run | sank a three-pointer at the buzzer | finished the race in record time |
        signed a new contract | tore a hamstring | equalised with a header | defended the title |
        served six aces | knocked out the favourite | crossed the finish line first |
        conceded a late goal | climbed to the top of the standings |
        dribbled past three defenders | was traded to a rival club | claimed a gold medal |
        made a diving save | bowled out the opening batsmen | landed a perfect triple jump |
        qualified for the playoffs | blocked the final shot | pulled a muscle while warming up |
        celebrated a hat trick | topped the leaderboard after the first round |
        was substituted at halftime | kicked a long field goal | retired after a long career |
        outsprinted the pack | committed a foul in the box | kept a clean sheet |
        earned a spot on the podium | set up the winning try | won the derby | saved match point |
        trained twice a day
        """
    ),
    "contexts": _phrases(
        """
        in extra time | at the stadium | during the playoffs | on the final lap |
        in front of a sold-out crowd | at the Olympics | in the opening round |
        after the halftime whistle | in the semifinal | on home turf | at the away ground |
        during the tournament | before the transfer deadline | in the fourth quarter |
        on the clay court | at the velodrome | in the bottom of the ninth |
        at the world cup qualifier | during the penalty shootout | at the training ground
        """
    ),
}

_WEATHER = {
    "agents": _phrases(
        """
        the storm | a cold front | the morning fog | heavy rain | the heatwave |
        a sudden gust of wind | the thunderstorm | the blizzard | the hurricane |
        a band of drizzle | the humidity | the frost | a tornado | the monsoon | the hailstorm |
        the sleet | the drought | the typhoon | the overcast sky | a sea breeze | the snowfall |
        the cloudburst | the gale | the cold snap | a low pressure system |
        a tropical depression | the dense smog | the freezing rain | the bright sunshine |
        the autumn mist
        """
    ),
    "actions": _phrases(
        """
        flooded the low streets | knocked out power lines | lifted by late morning |
        dropped temperatures below freezing | brought record rainfall |
        left a thick layer of ice on the roads | pushed the thermometer past forty degrees |
        delayed flights at the airport | turned the sky dark grey | blew tiles off the roofs |
        cleared away by the afternoon | soaked the commuters | made the roads slippery |
        buried the village in snow | drifted in from the sea |
        caused the river to burst its banks | dried out the reservoirs | settled over the valley |
        rattled windows all night | swept across the plains | left a rainbow over the hills |
        kept the air muggy and damp | lashed the coast with waves |
        left frost on the windshields | melted the last of the snow | darkened the horizon |
        produced lightning strikes | stalled over the region | cooled the evening air |
        warmed the afternoon | piled up snowdrifts | set off the flood sirens |
        drenched the festival grounds | pelted the cars with hail | hung over the city |
        brought clear blue skies | raised the flood warning | moved inland |
        dumped ten centimetres of snow | made everyone reach for an umbrella
        """
    ),
    "contexts": _phrases(
        """
        overnight | along the coast | in the mountains | across the northern region |
        before dawn | throughout the weekend | near the harbour | over the valley |
        for the third day in a row | at higher elevations | in the lowlands |
        during the evening rush hour | after sunset | across the plains | near the lake |
        on the eastern shore | during the night | by midday | in the foothills |
        under a grey sky
        """
    ),
}

_FOOD = {
    "agents": _phrases(
        """
        the chef | my grandmother | the bakery on the corner | the new restaurant |
        the pastry cook | the food truck | the sushi bar | the cafeteria | the caterers |
        the pizzeria | the head waiter | the family diner | the butcher | the cheesemonger |
        the noodle shop | the home cook | the taqueria | the patisserie | the brewery |
        the vegan cafe | the street vendor | the sous chef | the fishmonger | the barista |
        the dumpling house | the steakhouse | the tea room | the food critic | the greengrocer |
        the creamery
        """
    ),
    "actions": _phrases(
        """
        baked fresh sourdough | simmered a rich tomato sauce | served spicy noodles |
        roasted a whole chicken with garlic | whipped cream for the strawberries |
        grilled skewers of lamb | fried crispy dumplings | tossed a salad with feta and olives |
        seasoned the soup with fresh basil | ran out of croissants | poured thick hot chocolate |
        marinated the tofu in soy and ginger | plated a creamy risotto | sliced ripe mangoes |
        kneaded dough for flatbread | braised short ribs in red wine |
        sprinkled cinnamon on the pancakes | brewed a strong espresso |
        stuffed peppers with rice | smoked salmon over oak chips |
        melted butter over the lobster | pickled cucumbers with dill |
        steamed mussels in white wine | glazed the doughnuts with honey |
        ground fresh pepper over the pasta | stirred the curry until it thickened |
        chopped onions for the stew | served a tangy lemon tart | sauteed mushrooms in butter |
        crumbled blue cheese over the burger | toasted sesame seeds for the ramen |
        scooped pistachio gelato | fermented cabbage into kimchi | carved the holiday turkey |
        folded blueberries into muffin batter | drizzled olive oil over the bruschetta |
        boiled potatoes for the mash | rolled fresh pasta by hand | tasted the broth for salt |
        whisked eggs into an omelette
        """
    ),
    "contexts": _phrases(
        """
        for dinner | at the farmers market | in the kitchen | for the weekend brunch |
        at the food festival | for the wedding banquet | before the lunch rush |
        on the tasting menu | for the picnic | at the night market | in a cast iron pan |
        in the wood-fired oven | for dessert | at the buffet | for the birthday party |
        over a low flame | for the school lunch | at the harvest supper |
        with a pinch of sea salt | on a chilly evening
        """
    ),
}

_TECHNOLOGY = {
    "agents": _phrases(
        """
        the new smartphone | the software update | the startup | the laptop | the engineers |
        the cloud provider | the chip maker | the antivirus program | the open source project |
        the search engine | the social network | the web browser | the database server |
        the game console | the robot vacuum | the smartwatch | the app developers |
        the operating system | the router | the data scientists | the cybersecurity team |
        the car's navigation software | the smart speaker | the graphics card |
        the semiconductor plant | the programming language | the tablet | the printer driver |
        the encryption library | the hackers
        """
    ),
    "actions": _phrases(
        """
        crashed after the upgrade | released a new version | patched a security flaw |
        shipped a faster processor | leaked millions of passwords | rebooted without warning |
        drained the battery in an hour | compiled the code without errors |
        launched a subscription service | migrated the database to the cloud |
        overheated while rendering video | added support for wireless charging |
        fixed a memory leak | encrypted all messages end to end |
        went offline after a power outage | doubled the download speed |
        recalled a faulty charger | deployed a firmware update | published its compiler |
        blocked a phishing campaign | froze during the installation |
        synced the files across devices | upgraded the storage to two terabytes |
        exposed a bug in the kernel | streamed games in high definition |
        reached a billion downloads | introduced a folding screen |
        cut the latency of the network | broke backwards compatibility |
        indexed the entire website | automated the test suite |
        swapped the hard drive for a solid state disk | throttled the bandwidth |
        unveiled a quantum processor | scanned the network for malware |
        switched to a new web framework | debugged the login page | refreshed the user interface |
        sold out of headsets | hosted a developer conference
        """
    ),
    "contexts": _phrases(
        """
        in the data center | on the server | after the firmware update |
        during the product launch | at the tech conference | on the company website |
        in the app store | over the wifi network | on the production cluster |
        during the beta test | in the latest release | on the developer forum |
        for millions of users | in the code repository | at the hackathon | in the settings menu |
        on the mobile network | after the outage | with a single line of code |
        behind a login screen
        """
    ),
}

#: Topic name -> its agent, action and context phrases.
TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "sports": _SPORTS,
    "weather": _WEATHER,
    "food": _FOOD,
    "technology": _TECHNOLOGY,
}


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def topic_sentences(per_topic: int = 150, seed: int = 0) -> list[tuple[str, str]]:
    """Generate ``per_topic`` distinct labelled sentences for each of the four topics.

    Args:
        per_topic: sentences per topic, at most a few thousand (the frames times the phrases).
        seed: seeds the draw; the same seed gives the same list, in the same order.

    Returns:
        ``(topic, sentence)`` pairs, topic by topic in :data:`TOPICS` order.

    Raises:
        ValueError: ``per_topic`` is below 1 or above 5000.

    Example:
        >>> topic_sentences(per_topic=1, seed=3) == topic_sentences(per_topic=1, seed=3)
        True
    """
    if not 1 <= per_topic <= 5000:
        raise ValueError(f"per_topic must be in [1, 5000], got {per_topic}")
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for topic, words in TOPICS.items():
        seen: set[str] = set()
        while len(seen) < per_topic:
            frame = rng.choice(_FRAMES)
            agent = rng.choice(words["agents"])
            action = rng.choice(words["actions"])
            context = rng.choice(words["contexts"])
            sentence = frame.format(
                a=agent, A=_capitalise(agent), x=action, c=context, C=_capitalise(context)
            )
            if sentence not in seen:
                seen.add(sentence)
                rows.append((topic, sentence))
    return rows
