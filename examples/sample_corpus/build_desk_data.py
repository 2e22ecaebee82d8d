"""Writes the Nightwatch desk's generation templates and its held-out eval set from the phrasings below.

    python examples/sample_corpus/build_desk_data.py   # rewrites the desk_* files but desk_tools.json,
                                                       # desk_workflows.txt and desk_requests.jsonl

The desk's tools are `desk_tools.json`, its workflows the Gridbook's chapter 8 (`desk_workflows.txt`).
Two sets of requests are written here, by hand and apart from each other:

- `desk_templates.json`: a `generate_synthetic_data` template generator for the `workflow_traces`
  task. Each template is one desk conversation (request, tool call, tool result, answer; the red-drop
  and amber workflows make two or three calls) with {slots}; the slot values come from the tools'
  schemas (enums, ID patterns) and the Gridbook (districts, streets, reads by band, staff names).
- `desk_eval.jsonl`: the held-out suite's items. Requests phrased differently from the templates,
  about tickets, lines and cabinets whose IDs the templates never draw, each answered by the one
  right call. Items about one case (the same ticket and line) share `metadata.case`, the suite's
  cluster key. Some items are a workflow's second or third step: the earlier calls and the tools'
  answers are in the prompt, and the reference is the next call.

The output is deterministic: the same script writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEM = "You are the Nightwatch desk assistant."
DISTRICT_CABINETS = {"Brennock": 1, "Ostrey": 2, "Kelmarsh": 3, "Tarrow Bay": 4}
STREETS = ["Quay Road", "Market Row", "Tanner Street", "Kelmarsh Green", "Cliff Road", "Hollin Park", "Station Yard",
           "Orchard Rise", "Fenwick Lane", "Harbour Wall", "Mill Lane", "Chapel Street", "Weir Close", "Bramble Way",
           "Ferry Steps", "Long Acre", "Saltings Road", "Copper Hill", "Abbey Walk", "Netherby Court"]
SITES = {"Brennock": ("BCH", "Brennock Core Hall"), "Ostrey": ("OCH", "Ostrey Core Hall"),
         "Kelmarsh": ("KEH", "Kelmarsh Hub"), "Tarrow Bay": ("TBH", "Tarrow Bay Hub")}
WET_CABINETS = {"SC-114": ("Tanner Street", "Brennock"), "SC-411": ("Harbour Wall", "Tarrow Bay")}
STAFF = ["Ilse Varga", "Tobin Marsh", "Nia Cardew", "Marit Solberg", "Rhian Ogle", "Cato Ferris", "Dana Roeslin",
         "Piet Aldermann", "Owen Tregaskis", "Sunniva Carrick", "Lale Morrow", "Hedda Fairlie"]


def call(name: str, **arguments: str) -> str:
    """A tool call as the desk writes it (GB-8.1), arguments in key order: the reference text."""
    return json.dumps({"name": name, "arguments": dict(sorted(arguments.items()))})


def traced(name: str, **arguments: str) -> dict[str, Any]:
    """An assistant turn that calls a tool, as a workflow-trace template writes it."""
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": arguments}}]}


# ---- results the tools give (shared by templates and eval prompts) -------------------------------

LOOKUP_RESULT = ("{ticket}: {state}, {priority}, {district}, line {line}, port {cabinet}/{splitter}/{port}. "
                 "Last note: {note}")
READ_RESULT = {
    "red": "{line}: fresh read {red_read} dBm, red. Last four reads: {red_read}, {red_read}, -22.1, -21.9 dBm.",
    "amber": "{line}: fresh read {amber_read} dBm, amber. Last four reads: {amber_read}, -25.4, -25.2, -24.9 dBm.",
    "green": "{line}: fresh read {green_read} dBm, green. Last four reads: {green_read}, -19.4, -19.6, -19.5 dBm.",
}
SPLITTER_RESULT = {
    "single": "{cabinet}/{splitter}: 30 green, 1 offline, 1 red (port {port}).",
    "all": "{cabinet}/{splitter}: 0 green, 29 red, 3 offline. Splitters on the other ports of {cabinet} are green.",
}


# ---- training templates: (requests, calls and results, answer) per intent ------------------------

def _single(requests: list[str], name: str, arguments: dict[str, str], result: str, answer: str
            ) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request},
                          traced(name, **arguments), {"role": "tool", "name": name, "content": result},
                          {"role": "assistant", "content": answer}]} for request in requests]


WINDOW_CUES = {
    "AM": ["The customer wants the morning slot.", "They asked for AM.", "Customer picked 08:00 to 12:00.",
           "Morning suits them, it is a P3."],
    "PM": ["The customer wants the afternoon slot.", "They asked for PM.", "Customer picked 12:00 to 16:00.",
           "Afternoon suits them, it is a P3."],
    "first_free": ["It is a P2, so first free slot.", "No service, P2: give it the first free slot.",
                   "Red after two reseats, book the first free slot.", "P2 red-drop, earliest slot we have."],
    "emergency": ["It is a P1 and the lead has approved an emergency walk-out.",
                  "Business HF-400 down, P1, emergency walk-out approved by the lead.",
                  "T3 asked for an emergency walk-out, lead said yes.", "P1, send someone now, lead approved."],
}
ESCALATION_CUES = {
    "dark_cabinet": ["{cabinet} has gone black on the Lightboard.", "The {cabinet} tile turned black.",
                     "Dark cabinet: every splitter on {cabinet} is offline."],
    "splitter_fault": ["Everyone on splitter {splitter} of {cabinet} is red, the other splitters are green.",
                       "Whole of {cabinet}/{splitter} went red at once.",
                       "Splitter fault on {cabinet}/{splitter}, all 32 customers red or offline."],
    "lambda_lane_alarm": ["Lambda lane alarm on BCH-KEH L{lane}.", "Lane alarm on the Ring, OCH-TBH L{lane}.",
                          "The Lightboard shows a lambda lane alarm on KEH-OCH L{lane}."],
    "olt_card_alarm": ["OLT card alarm at {site}.", "There is an OLT card alarm showing for {site}.",
                       "{site} has an OLT card alarm on the Lightboard."],
}
PARK_CUES = {
    "no_access": ["The technician found nobody home and left a blue card.", "No access, the customer was out.",
                  "Walk-out failed, customer not in."],
    "customer_callback": ["We are waiting for the customer to call us back.", "Customer will ring back with a time.",
                          "Waiting on a callback from the customer."],
    "part_needed": ["The technician needs a new wall box, it is on order.", "Waiting for a part to arrive.",
                    "An HF-400 is on order for this one."],
    "street_works_permit": ["The repair needs a street works permit.", "Waiting on the council for a permit.",
                            "Drop repair is blocked until the street works permit comes through."],
}
CLOSE_CUES = {
    "C1": ["The reseat fixed it, read is green now.", "Dust cap in the connector, cleaned, green.",
           "ONT swapped, line green."],
    "C2": ["The technician replaced the crushed tail, green now.", "Drop repaired with one splice, read green.",
           "Tail was trapped under a door, rerouted, green."],
    "C3": ["Fixed in the cabinet, splice tray resealed, green.",
           "Splitter patch point cleaned in the cabinet, all green.",
           "Technician fixed it in the splice cabinet."],
    "C4": ["T3 replaced the OLT card, service back.", "Feeder repaired by T3, fixed in the core.",
           "Core fix, lane swapped back, all green."],
    "C8": ["It was the customer's own router.", "The ONT was switched off at the wall by the customer.",
           "Customer's side: their Wi-Fi extender was the problem."],
    "C9": ["No fault found, read green for 48 hours.", "Customer could not be reached after three tries, 72 hours.",
           "Amber watch ended back in green, no fault found."],
}


def templates() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    lookup_answer = "{ticket} is {state} at {priority} in {district}, on line {line} ({cabinet}/{splitter}/{port})."
    out += _single(["Look up ticket {ticket}.", "Can you pull up {ticket} for me?",
                    "{opener}Open {ticket} please, the customer is on the line.", "What state is ticket {ticket} in?",
                    "Show me ticket {ticket}.", "{opener}Customer quotes {ticket}. Find it.",
                    "Get me the details of {ticket}.", "Who has {ticket} and what was the last note?"],
                   "lookup_ticket", {"ticket_id": "{ticket}"}, LOOKUP_RESULT, lookup_answer)
    for band in ("red", "amber", "green"):
        out += _single(["Take a fresh read on {line}.", "{opener}What is the light level on {line}?",
                        "Check the light on line {line}.", "Read {line} again please.",
                        "Get a fresh light read for {line}, customer in {district}."],
                       "check_light_level", {"line_id": "{line}"}, READ_RESULT[band],
                       f"Fresh read on {{line}} is {{{band}_read}} dBm, {band}.")
    for shape in ("single", "all"):
        out += _single(["Check the neighbours on {cabinet}/{splitter}.",
                        "{opener}How does splitter {splitter} in {cabinet} look?",
                        "Are the others on {cabinet} splitter {splitter} green?",
                        "Check splitter {splitter} of cabinet {cabinet}."],
                       "check_splitter", {"cabinet": "{cabinet}", "splitter": "{splitter}"}, SPLITTER_RESULT[shape],
                       "Splitter {cabinet}/{splitter}: " + ("only port {port} is red, so the fault is on this line."
                                                            if shape == "single"
                                                            else "all red: a splitter fault, page T3."))
    booked = "{line}: walk-out booked, slot {slot}. Ticket moved to WALKED."
    for window, cues in WINDOW_CUES.items():
        out += _single([f"Book a walk-out for {{line}}. {cue}" for cue in cues[:2]]
                       + [f"{{opener}}{cue} Line {{line}} needs a technician." for cue in cues[2:]],
                       "book_field_visit", {"line_id": "{line}", "window": window}, booked.replace("{slot}", window),
                       f"Walk-out booked for {{line}} ({window}); the customer gets a text 30 minutes before.")
    paged = "{ticket}: T3 paged through the duty manager on 4490, reason {reason}. T3 owns the ticket."
    for reason, cues in ESCALATION_CUES.items():
        out += _single([f"{cue} Page T3 on {{ticket}}." for cue in cues[:2]]
                       + [f"{{opener}}{cues[2]} Ticket {{ticket}}, escalate it."],
                       "escalate_t3", {"ticket_id": "{ticket}", "reason": reason}, paged.replace("{reason}", reason),
                       f"T3 is paged on {{ticket}} for {reason.replace('_', ' ')}.")
    parked = "{ticket}: PARKED, reason {reason}."
    for reason, cues in PARK_CUES.items():
        out += _single([f"Park {{ticket}}. {cue}" for cue in cues[:2]]
                       + [f"{{opener}}{cues[2]} Park ticket {{ticket}}."],
                       "park_ticket", {"ticket_id": "{ticket}", "reason": reason}, parked.replace("{reason}", reason),
                       f"{{ticket}} is parked ({reason.replace('_', ' ')}); it comes up at the 09:00 review.")
    out += _single(["Reopen {ticket}.", "{opener}The customer called back with a time, reopen {ticket}.",
                    "{ticket} bounced, the fault is back a week after closing. Reopen it.",
                    "Put {ticket} back to OPEN please."],
                   "reopen_ticket", {"ticket_id": "{ticket}"}, "{ticket}: OPEN again.",
                   "{ticket} is OPEN again; take a fresh read before anyone is sent out.")
    closed = "{ticket}: CLOSED with {code}."
    for code, cues in CLOSE_CUES.items():
        out += _single([f"Close {{ticket}}. {cue}" for cue in cues[:2]]
                       + [f"{{opener}}{cues[2]} Close ticket {{ticket}}."],
                       "close_ticket", {"ticket_id": "{ticket}", "close_code": code}, closed.replace("{code}", code),
                       f"{{ticket}} is closed with {code}.")
    out += _single(["Start an amber watch on {line}.",
                    "{opener}{line} is still amber after the reseat and the tail check. Put it on watch.",
                    "Amber watch for line {line} please.",
                    "{line} reads {amber_read} dBm, amber, after one reseat. Watch it for 48 hours."],
                   "start_amber_watch", {"line_id": "{line}"}, "{line}: amber watch started, 48 hours.",
                   "{line} is on amber watch for 48 hours; the ticket stays OPEN.")
    out += _district_templates()
    out += _workflows()
    return out


def _district_templates() -> list[dict[str, Any]]:
    """The tools that take a site, a district, a wet cabinet or a storm reason (GB-8.10)."""
    out: list[dict[str, Any]] = []
    for district, (site, hall) in SITES.items():
        digit = list(SITES).index(district) + 1
        out += _single([f"{{opener}}Any OLT card alarms at {hall}?", f"{{opener}}Check the OLT cards for {district}.",
                        f"{{opener}}SC-{digit}{{nn}} just went dark. Look at the OLT alarms at its site.",
                        f"{{opener}}Is there an OLT alarm at {site}? {{staff}} is asking.",
                        f"{{opener}}Customers on SC-{digit}{{nn}} dropping, check the card alarms at {hall}."],
                       "check_olt_alarms", {"site": site}, f"{site}: no OLT card alarm since {{time}}.",
                       f"No OLT card alarm at {hall}, so treat it as a feeder cut until proven otherwise (GB-5.2).")
        out += _single([f"{{opener}}Lots of ONTs offline in {district} and no cabinet alarm. Is it a power cut?",
                        f"{{opener}}Check the power company's outage page for {district}.",
                        f"{{opener}}{{street}} in {district} has gone offline, every house. Power cut?",
                        (f"{{opener}}{{staff}} says the lights are out on {{street}}, {district}. "
                         "Check for a power cut.")],
                       "check_power_outage", {"district": district},
                       f"{district}: power cut reported at {{time}}, expected back in 2 hours.",
                       f"There is a power cut in {district}: the ONTs range again by themselves when power "
                       "returns (GB-7.6).")
        out += _single([f"{{opener}}Parked review for {district}, list the parked tickets.",
                        f"{{opener}}What is parked in {district} this morning?",
                        f"{{opener}}Show me every PARKED ticket in {district}, {{staff}} is doing the review."],
                       "list_parked_tickets", {"district": district},
                       f"{district}: 3 PARKED: {{ticket}} no_access 20 h, part_needed 40 h, customer_callback 70 h.",
                       "Three parked; the one at 70 hours must be reopened or closed this morning (GB-2.3).")
    for cabinet, (street, district) in WET_CABINETS.items():
        out += _single([f"{{opener}}Heavy rain in {district}. Check the wet cabinet.",
                        f"{{opener}}Amber count on {cabinet}?",
                        f"{{opener}}How is the wet cabinet on {street} doing?",
                        f"{{opener}}It is {{time}}, time for the hourly check on {cabinet}."],
                       "check_wet_cabinet", {"cabinet": cabinet},
                       f"{cabinet}: 2 amber, 0 red at {{time}} (1 amber an hour before).",
                       f"{cabinet} is up by one amber-drop: below the three that need a walk-out (GB-5.5).")
    out += _single(["{opener}The Met Office has a flood warning out for the valley. Raise the storm flag.",
                    "{opener}High wind warning for tonight, official. Storm flag please.",
                    "{opener}Weather warning issued for the Vell Valley at {time}.",
                    "{opener}{staff} saw the official storm warning. Put the flag up."],
                   "raise_storm_flag", {"reason": "weather_warning"}, "Storm flag raised at {time}: weather_warning.",
                   "The storm flag is up: P3 and P4 walk-outs are suspended (GB-7.1).")
    out += _single(["{opener}Three cabinets have gone dark since {time}. Raise the storm flag.",
                    "{opener}SC-{nn}1, SC-{nn}2 and SC-{nn}3 all dark within the hour. Storm flag.",
                    "{opener}Fourth dark cabinet this hour, raise the flag.",
                    "{opener}{staff} counts three black cabinet tiles in the last hour. Storm flag."],
                   "raise_storm_flag", {"reason": "cabinets_dark"}, "Storm flag raised at {time}: cabinets_dark.",
                   "The storm flag is up: T2 technicians move to P1 and P2 work (GB-7.1).")
    return out


def _workflows() -> list[dict[str, Any]]:
    """The red-drop workflow (GB-8.10) as two- and three-call traces."""
    lookup = {"role": "tool", "name": "lookup_ticket", "content": LOOKUP_RESULT}
    read = {"role": "tool", "name": "check_light_level", "content": READ_RESULT["red"]}
    neighbours = {"role": "tool", "name": "check_splitter", "content": SPLITTER_RESULT["single"]}
    out = []
    for request in ["Customer on {ticket} has no service and a red LOS light.",
                    "{opener}{ticket}: customer says the LOS light is red. Take a read.",
                    "No service on {ticket}, what does the light say?"]:
        out.append({"messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": request},
            traced("lookup_ticket", ticket_id="{ticket}"), lookup,
            traced("check_light_level", line_id="{line}"), read,
            traced("check_splitter", cabinet="{cabinet}", splitter="{splitter}"), neighbours,
            {"role": "assistant", "content": "{line} reads {red_read} dBm, red, and its neighbours on "
             "{cabinet}/{splitter} are green: the fault is on this line. Guide a reseat under GB-3.3."}]})
    for request in ["Customer on {ticket} is calling about slow evenings. Check the light.",
                    "{opener}Can you read the line on ticket {ticket}?"]:
        out.append({"messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": request},
            traced("lookup_ticket", ticket_id="{ticket}"), lookup,
            traced("check_light_level", line_id="{line}"),
            {"role": "tool", "name": "check_light_level", "content": READ_RESULT["amber"]},
            {"role": "assistant", "content": "{line} reads {amber_read} dBm, amber. Guide one reseat and a tail "
             "check, then start an amber watch if it stays amber."}]})
    return out


def instruction_templates(traces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `instructions` task's templates: each trace's request and its first call, the call written
    as the assistant's text the way the desk writes it (GB-8.1). Braces that close the JSON are
    doubled, since a template's `}}` stands for a literal `}`."""
    out = []
    for trace in traces:
        system, user, first = trace["messages"][:3]
        function = first["tool_calls"][0]["function"]
        text = json.dumps({"name": function["name"], "arguments": dict(sorted(function["arguments"].items()))})
        out.append({"messages": [system, user, {"role": "assistant", "content": text.replace("}}", "}}}}")}]})
    return out


def slots(rng: random.Random, held_out: dict[str, set[str]]) -> dict[str, list[str]]:
    """Slot values: IDs drawn from the tools' patterns (never the eval's), the rest from the Gridbook."""
    def ids(prefix: str, digits: int, n: int, exclude: set[str]) -> list[str]:
        out: set[str] = set()
        while len(out) < n:
            value = f"{prefix}{rng.randrange(10 ** digits):0{digits}d}"
            if value not in exclude:
                out.add(value)
        return sorted(out)

    cabinets = sorted(f"SC-{d}{n:02d}" for d in range(1, 5) for n in range(1, 50))
    return {
        "ticket": ids("NW-", 5, 600, held_out["ticket"]),
        "line": ids("HL-", 6, 600, held_out["line"]),
        "cabinet": [c for c in cabinets if c not in held_out["cabinet"]],
        "splitter": ["A", "B", "C", "D"],
        "port": [f"{n:02d}" for n in range(1, 33)],
        "district": list(DISTRICT_CABINETS),
        "state": ["OPEN", "OPEN", "WALKED", "PARKED"],
        "priority": ["P2", "P2", "P3", "P1"],
        "note": ["two reseats, still red.", "customer called back.", "walk-out booked.", "fresh read amber.",
                 "no access, blue card left.", "tail check done.", "waiting on T3."],
        "red_read": [f"-{27 + t / 10:.1f}" for t in range(2, 45, 3)],
        "amber_read": [f"-{25 + t / 10:.1f}" for t in range(1, 20, 2)],
        "green_read": [f"-{14 + t / 10:.1f}" for t in range(0, 100, 7)],
        "lane": [f"{n:02d}" for n in range(1, 33)],
        "nn": [f"{n:02d}" for n in range(1, 50)],
        "street": STREETS[:10],
        "site": ["Brennock Core Hall", "Ostrey Core Hall", "Kelmarsh Hub", "Tarrow Bay Hub"],
        "opener": ["", "", "", "Hi, ", "Quick one: ", "Deep shift here. ", "Dusk desk: ", "Morning! ", "Day shift: ",
                   "Hello, ", "Urgent: ", "Nightwatch lead here. ", "Sorry to chase: ", "Next one. "],
        "time": [f"{h:02d}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)],
        "staff": STAFF,
    }


# ---- the desk's ticket log: a month of state changes, for pre-training ---------------------------

def _log_entry(rng: random.Random, ticket: str, line: str) -> str:
    """One ticket's lines in the desk log; every line names the ticket or the line it acts on."""
    district = rng.choice(list(DISTRICT_CABINETS))
    cabinet, splitter = f"SC-{DISTRICT_CABINETS[district]}{rng.randrange(1, 100):02d}", rng.choice("ABCD")
    port, staff = f"{cabinet}/{splitter}/{rng.randrange(1, 33):02d}", rng.choice(STAFF)
    hour, minute = rng.randrange(24), rng.randrange(60)
    red, amber, green = (f"-{rng.uniform(a, b):.1f}" for a, b in ((27.2, 33.0), (25.1, 26.9), (14.0, 22.0)))

    def at(step: int) -> str:
        total = hour * 60 + minute + step
        return f"{total // 60 % 24:02d}:{total % 60:02d}"

    kind = rng.choice(["walk", "walk", "amber", "reseat", "customer", "dark", "noaccess", "lane"])
    head = f"{ticket} | {district} | {line} | {port} | {staff}"
    if kind == "walk":
        body = [f"{at(0)} {ticket} OPEN P2: no service, red LOS. Fresh read on {line}: {red} dBm, red.",
                f"{at(3)} Neighbours on {cabinet}/{splitter} green: the fault is on {line}.",
                f"{at(14)} Reseat 1 on {line}: {red} dBm, red. Reseat 2 on {line}: still red.",
                f"{at(16)} {ticket} OPEN -> WALKED: walk-out on {line}, first free slot.",
                f"{at(600)} {ticket} WALKED -> CLOSED C2: tail replaced on {line}, {green} dBm, green."]
    elif kind == "amber":
        slot = rng.choice(["AM", "PM"])
        body = [f"{at(0)} {ticket} OPEN P3: slow evenings. Fresh read on {line}: {amber} dBm, amber.",
                f"{at(9)} Reseat and tail check on {line}: still amber. Amber watch started on {line}.",
                f"{at(2880)} Amber watch on {line} ended steady in amber. {ticket} OPEN -> WALKED, {slot} slot.",
                f"{at(3600)} {ticket} WALKED -> CLOSED C2: dirty wall box adapter cleaned, {line} {green} dBm."]
    elif kind == "reseat":
        body = [f"{at(0)} {ticket} OPEN P2: red LOS. Fresh read on {line}: {red} dBm, red.",
                f"{at(8)} Reseat 1 on {line}: {green} dBm, green, dust on the connector.",
                f"{at(9)} {ticket} OPEN -> CLOSED C1: fixed by the reseat, {line} green."]
    elif kind == "customer":
        body = [f"{at(0)} {ticket} OPEN P2: no service. Fresh read on {line}: {green} dBm, green.",
                f"{at(6)} PWR off on the ONT at {line}: adapter switched off at the wall.",
                f"{at(9)} {ticket} OPEN -> CLOSED C8: customer side, {line} back in service."]
    elif kind == "dark":
        body = [f"{at(0)} {ticket} OPEN P1: {cabinet} tile black, all splitters offline.",
                f"{at(2)} {ticket} paged T3 through 4490: dark cabinet {cabinet}. T3 owns {ticket}.",
                f"{at(300)} {ticket} CLOSED C4: feeder to {cabinet} repaired by T3."]
    elif kind == "noaccess":
        body = [f"{at(0)} {ticket} OPEN P2: red LOS on {line}, {red} dBm, red, two reseats.",
                f"{at(5)} {ticket} OPEN -> WALKED: walk-out on {line}, first free slot.",
                f"{at(700)} {ticket} WALKED -> PARKED: no access at {line}, blue card left.",
                f"{at(1400)} Parked review: customer called back. {ticket} PARKED -> OPEN.",
                f"{at(1402)} {ticket} OPEN -> WALKED: second walk-out on {line}, PM slot."]
    else:
        lane = f"L{rng.randrange(1, 33):02d}"
        span = rng.choice(["BCH-KEH", "KEH-OCH", "OCH-TBH", "TBH-BCH"])
        body = [f"{at(0)} {ticket} OPEN P1: lambda lane alarm on {span} {lane}.",
                f"{at(1)} {ticket} paged T3 through 4490: lane alarm {span} {lane}. T3 owns {ticket}.",
                (f"{at(18)} T3 restoration lane swap of {span} {lane} onto L{rng.randrange(33, 41)}. "
                 f"{ticket} CLOSED C4.")]
    return "\n".join([head, *body])


def desk_log(rng: random.Random, held_out: dict[str, set[str]], tickets: int = 320) -> str:
    entries = []
    for _ in range(tickets):
        ticket, line = f"NW-{rng.randrange(10 ** 5):05d}", f"HL-{rng.randrange(10 ** 6):06d}"
        if ticket not in held_out["ticket"] and line not in held_out["line"]:
            entries.append(_log_entry(rng, ticket, line))
    return "\n\n".join(entries) + "\n"


# ---- the held-out eval items ---------------------------------------------------------------------

EVAL_REQUESTS: dict[str, list[tuple[str, str, dict[str, str]]]] = {
    # intent: [(request, tool, arguments)], IDs as {ticket} {line} {cabinet} {splitter}
    "lookup": [
        ("Caller is quoting {ticket}, could you bring it up?", "lookup_ticket", {"ticket_id": "{ticket}"}),
        ("I need the last note on {ticket} before I ring the customer back.",
         "lookup_ticket", {"ticket_id": "{ticket}"}),
        ("{staff} left {ticket} in the handover note, what is going on with it?",
         "lookup_ticket", {"ticket_id": "{ticket}"}),
        ("Which line is {ticket} about?", "lookup_ticket", {"ticket_id": "{ticket}"}),
        ("What priority did {ticket} get?", "lookup_ticket", {"ticket_id": "{ticket}"}),
        ("Has anyone touched {ticket} since this morning?", "lookup_ticket", {"ticket_id": "{ticket}"}),
    ],
    "read": [
        ("Customer on {line} says the internet keeps cutting out. What is the light doing?",
         "check_light_level", {"line_id": "{line}"}),
        ("Need a fresh light reading on {line}, they have just reseated the ONT.",
         "check_light_level", {"line_id": "{line}"}),
        ("Is {line} still in the red?", "check_light_level", {"line_id": "{line}"}),
        ("Before I close this one, what does {line} read now?", "check_light_level", {"line_id": "{line}"}),
        ("The walk note for {line} just came in, check the light before we close.",
         "check_light_level", {"line_id": "{line}"}),
        ("How strong is the signal on line {line} right now?", "check_light_level", {"line_id": "{line}"}),
    ],
    "splitter": [
        ("One red-drop on {cabinet}/{splitter}, are the rest of that splitter OK?",
         "check_splitter", {"cabinet": "{cabinet}", "splitter": "{splitter}"}),
        ("Are the other customers on splitter {splitter} at {cabinet} green or not?",
         "check_splitter", {"cabinet": "{cabinet}", "splitter": "{splitter}"}),
        ("Three calls from {street} in ten minutes, all on {cabinet} splitter {splitter}. Check the splitter.",
         "check_splitter", {"cabinet": "{cabinet}", "splitter": "{splitter}"}),
        ("Before I book anything, look at the neighbours on {cabinet}/{splitter}.",
         "check_splitter", {"cabinet": "{cabinet}", "splitter": "{splitter}"}),
    ],
    "book_am": [
        ("{line} steady amber for 48 hours; the customer would like a morning visit.",
         "book_field_visit", {"line_id": "{line}", "window": "AM"}),
        ("Customer on {line} can only do mornings, please book the technician.",
         "book_field_visit", {"line_id": "{line}", "window": "AM"}),
        ("P3 on {line}, swinging reads after a reseat. Customer chose the AM slot.",
         "book_field_visit", {"line_id": "{line}", "window": "AM"}),
    ],
    "book_pm": [
        ("Customer on {line} is at work until lunch, so an afternoon walk-out please.",
         "book_field_visit", {"line_id": "{line}", "window": "PM"}),
        ("{line} needs a technician for a P3; they chose the PM slot.",
         "book_field_visit", {"line_id": "{line}", "window": "PM"}),
        ("Amber watch on {line} ended still amber. Send T2 in the afternoon, that suits them.",
         "book_field_visit", {"line_id": "{line}", "window": "PM"}),
    ],
    "book_first": [
        ("Still red on {line} after the second reseat. Get a technician out at the first free slot.",
         "book_field_visit", {"line_id": "{line}", "window": "first_free"}),
        ("P2, no service on {line}, tail looks crushed. Book the earliest walk-out.",
         "book_field_visit", {"line_id": "{line}", "window": "first_free"}),
        ("The amber watch on {line} fell into red. Book the first free slot now.",
         "book_field_visit", {"line_id": "{line}", "window": "first_free"}),
        ("Hot-drop on {line}, it needs an attenuator fitted. First free slot please, it is a P2.",
         "book_field_visit", {"line_id": "{line}", "window": "first_free"}),
    ],
    "book_emergency": [
        ("HF-400 business line {line} is down, lead approved an emergency walk-out.",
         "book_field_visit", {"line_id": "{line}", "window": "emergency"}),
        ("T3 wants a technician at {line} tonight for the P1, the lead has signed it off as an emergency.",
         "book_field_visit", {"line_id": "{line}", "window": "emergency"}),
    ],
    "t3_dark": [
        ("The tile for {cabinet} just went black. Get T3 on {ticket}.",
         "escalate_t3", {"ticket_id": "{ticket}", "reason": "dark_cabinet"}),
        ("{cabinet} is completely dark, all four splitters offline. I've raised {ticket} as a P1, escalate.",
         "escalate_t3", {"ticket_id": "{ticket}", "reason": "dark_cabinet"}),
    ],
    "t3_splitter": [
        ("All 32 on {cabinet}/{splitter} went red together while the other splitters are fine. Page core on {ticket}.",
         "escalate_t3", {"ticket_id": "{ticket}", "reason": "splitter_fault"}),
        ("Looks like a splitter fault at {cabinet} splitter {splitter}. Hand {ticket} to T3.",
         "escalate_t3", {"ticket_id": "{ticket}", "reason": "splitter_fault"}),
    ],
    "t3_lane": [
        ("The Ring is showing a lambda lane alarm on BCH-TBH L{lane}. Send {ticket} to T3.",
         "escalate_t3", {"ticket_id": "{ticket}", "reason": "lambda_lane_alarm"}),
        ("Lane alarm just popped on OCH-KEH L{lane}; {ticket} is the P1, escalate to core.",
         "escalate_t3", {"ticket_id": "{ticket}", "reason": "lambda_lane_alarm"}),
    ],
    "t3_olt": [
        ("OLT card alarm just came up for {hall}. Escalate {ticket} to T3.",
         "escalate_t3", {"ticket_id": "{ticket}", "reason": "olt_card_alarm"}),
        ("{hall} is showing an OLT card alarm and {ticket} is the P1 for it. Page core.",
         "escalate_t3", {"ticket_id": "{ticket}", "reason": "olt_card_alarm"}),
    ],
    "park_access": [
        ("{staff} waited 15 minutes at the house on {ticket} and nobody answered. Park it.",
         "park_ticket", {"ticket_id": "{ticket}", "reason": "no_access"}),
        ("No one was in for the walk-out on {ticket}, blue card left. Move it to parked.",
         "park_ticket", {"ticket_id": "{ticket}", "reason": "no_access"}),
    ],
    "park_callback": [
        ("Customer on {ticket} has to check with their landlord and will call us back. Park the ticket.",
         "park_ticket", {"ticket_id": "{ticket}", "reason": "customer_callback"}),
        ("Left a voicemail on {ticket}, waiting for them to ring back. Park it for now.",
         "park_ticket", {"ticket_id": "{ticket}", "reason": "customer_callback"}),
    ],
    "park_part": [
        ("{ticket} needs a replacement HF-400 and it is on order. Park it until the part arrives.",
         "park_ticket", {"ticket_id": "{ticket}", "reason": "part_needed"}),
        ("Technician on {ticket} needs a new wall box that is not in the van. Park it while it is ordered.",
         "park_ticket", {"ticket_id": "{ticket}", "reason": "part_needed"}),
    ],
    "park_permit": [
        ("The drop on {ticket} runs under the road and we need a permit from the council. Park it.",
         "park_ticket", {"ticket_id": "{ticket}", "reason": "street_works_permit"}),
        ("{ticket} is stuck until the street works permit is granted, park it please.",
         "park_ticket", {"ticket_id": "{ticket}", "reason": "street_works_permit"}),
    ],
    "reopen": [
        ("The customer on {ticket} rang back and can give access on Friday, so take it out of parked.",
         "reopen_ticket", {"ticket_id": "{ticket}"}),
        ("{ticket} was closed five days ago and the fault has come back. Reopen it as a bounce.",
         "reopen_ticket", {"ticket_id": "{ticket}"}),
        ("Parked review: the permit for {ticket} came through, reopen the ticket.",
         "reopen_ticket", {"ticket_id": "{ticket}"}),
    ],
    "close_c1": [
        ("Reseat on {ticket} lifted the read back into green, close it as fixed at the ONT.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C1"}),
        ("{ticket}: the technician swapped the ONT and the line is green. Close it.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C1"}),
    ],
    "close_c2": [
        ("Walk note on {ticket}: crushed tail replaced, read green after. Close it.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C2"}),
        ("Drop on {ticket} was cut by a hedge trimmer, spliced and green now. Please close.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C2"}),
    ],
    "close_c3": [
        ("Water in the splice tray at the cabinet for {ticket}, dried and resealed, all green. Close it.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C3"}),
        ("{ticket} was fixed at the splice cabinet, dirty patch point cleaned. Close the ticket.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C3"}),
    ],
    "close_c4": [
        ("Core swapped the OLT card for {ticket} and service is back. Close it as a core fix.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C4"}),
        ("T3 repaired the feeder cut behind {ticket}, everyone green. Close.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C4"}),
    ],
    "close_c8": [
        ("Turns out the customer on {ticket} had unplugged the ONT. Close it, customer side.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C8"}),
        ("{ticket} was their own router all along, light is green. Close the ticket.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C8"}),
    ],
    "close_c9": [
        ("Three attempts and 72 hours parked with no reply on {ticket}. Close it.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C9"}),
        ("Amber watch on {ticket} finished in green and nothing was found. Close the ticket.",
         "close_ticket", {"ticket_id": "{ticket}", "close_code": "C9"}),
    ],
    "watch": [
        ("{line} is sitting at amber after one reseat and the tail is fine. Watch it for two days.",
         "start_amber_watch", {"line_id": "{line}"}),
        ("Keep an eye on {line} for 48 hours, it reads amber after the reseat.",
         "start_amber_watch", {"line_id": "{line}"}),
        ("Set {line} up for an amber watch, slow evenings, amber read.",
         "start_amber_watch", {"line_id": "{line}"}),
    ],
    "olt": [
        ("One card at {hall} has gone red on the Lightboard. Check the alarms there.",
         "check_olt_alarms", {"site": "{site}"}),
        ("{cabinet} went black a minute ago. Before T3 calls back, see whether the OLT at its site has alarmed.",
         "check_olt_alarms", {"site": "{site}"}),
        ("Check {site} for card alarms, customers in {district} are dropping.",
         "check_olt_alarms", {"site": "{site}"}),
    ],
    "power": [
        ("Half of {street} in {district} is offline and there is no cabinet alarm. Could it be the mains?",
         "check_power_outage", {"district": "{district}"}),
        ("Dozens of ONTs in {district} dropped at once with no light read at all. Check for a power cut.",
         "check_power_outage", {"district": "{district}"}),
        ("Is the electricity off anywhere in {district}?", "check_power_outage", {"district": "{district}"}),
    ],
    "parked": [
        ("It is 09:00, start the parked review with {district}.",
         "list_parked_tickets", {"district": "{district}"}),
        ("Which tickets are sitting in PARKED for {district}?",
         "list_parked_tickets", {"district": "{district}"}),
    ],
    "wet": [
        ("It has rained all night in {wet_district}. How many amber-drops on the {wet_street} cabinet?",
         "check_wet_cabinet", {"cabinet": "{wet}"}),
        ("Storm over the valley: do the hourly check on {wet}.", "check_wet_cabinet", {"cabinet": "{wet}"}),
    ],
    "storm_weather": [
        ("Official high wind warning for the Vell Valley from midnight. Put the storm flag up.",
         "raise_storm_flag", {"reason": "weather_warning"}),
        ("Flood warning issued for the whole valley, we need the storm flag.",
         "raise_storm_flag", {"reason": "weather_warning"}),
    ],
    "storm_dark": [
        ("{cabinet} is the third cabinet to go black within the hour. Storm flag now.",
         "raise_storm_flag", {"reason": "cabinets_dark"}),
        ("Three dark cabinets since 02:00, put the storm flag up.",
         "raise_storm_flag", {"reason": "cabinets_dark"}),
    ],
}
STEP_REQUESTS = ["Customer on {ticket} rang in, red LOS light and no internet. Can you check it out?",
                 "{ticket} has no service since the storm. Start the red-drop checks.",
                 "Red LOS on {ticket} according to the customer. What is the light saying?"]
CASE_INTENTS = [  # what happens to one case: requests about the same ticket and line
    ["lookup", "read", "book_first"], ["lookup", "park_access", "reopen"], ["read", "watch", "book_am"],
    ["read", "watch", "book_pm"], ["splitter", "t3_splitter"], ["t3_dark", "close_c4"], ["t3_lane", "close_c4"],
    ["t3_olt", "lookup"], ["park_callback", "reopen", "close_c9"], ["park_part", "close_c1"],
    ["park_permit", "reopen", "close_c2"], ["read", "close_c1"], ["lookup", "close_c2"], ["splitter", "close_c3"],
    ["read", "close_c8"], ["book_emergency", "close_c3"], ["lookup", "watch", "close_c9"],
    ["read", "book_first", "close_c2"],
    ["power", "olt"], ["storm_weather", "wet", "power"], ["parked", "lookup"], ["storm_dark", "olt", "t3_dark"],
    ["wet", "parked"], ["olt", "t3_olt"],
]


def eval_items(rng: random.Random, held_out: dict[str, set[str]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    used = {intent: 0 for intent in EVAL_REQUESTS}
    case = 0
    while len(items) < 300:
        values = _case_values(rng, held_out)
        intents = CASE_INTENTS[case % len(CASE_INTENTS)]
        for intent in intents:
            request, name, arguments = EVAL_REQUESTS[intent][used[intent] % len(EVAL_REQUESTS[intent])]
            used[intent] += 1
            items.append(_item([{"role": "user", "content": request.format(**values)}],
                               call(name, **{k: v.format(**values) for k, v in arguments.items()}),
                               values["ticket"], intent, 1))
        if case % 3 == 0:
            items += _step_items(values, case)
        case += 1
    return items


def _case_values(rng: random.Random, held_out: dict[str, set[str]]) -> dict[str, str]:
    district = rng.choice(list(DISTRICT_CABINETS))
    values = {"ticket": f"NW-{rng.randrange(10 ** 5):05d}", "line": f"HL-{rng.randrange(10 ** 6):06d}",
              "cabinet": f"SC-{DISTRICT_CABINETS[district]}{rng.randrange(50, 100):02d}",
              "splitter": rng.choice("ABCD"), "port": f"{rng.randrange(1, 33):02d}", "district": district,
              "street": rng.choice(STREETS), "staff": rng.choice(STAFF), "lane": f"{rng.randrange(1, 33):02d}",
              "site": SITES[district][0], "hall": SITES[district][1],
              "red_read": f"-{rng.uniform(27.2, 31.5):.1f}", "state": "OPEN", "priority": "P2",
              "note": "customer called in, red LOS."}
    wet = {"Brennock": "SC-114", "Tarrow Bay": "SC-411"}.get(district) or rng.choice(list(WET_CABINETS))
    values |= {"wet": wet, "wet_street": WET_CABINETS[wet][0], "wet_district": WET_CABINETS[wet][1]}
    for key in ("ticket", "line", "cabinet"):
        held_out[key].add(values[key])
    return values


def _step_items(values: dict[str, str], case: int) -> list[dict[str, Any]]:
    """The red-drop workflow's second and third calls (GB-8.10), with the earlier calls and answers."""
    request = STEP_REQUESTS[(case // 3) % len(STEP_REQUESTS)].format(**values)
    first = [{"role": "user", "content": request},
             {"role": "assistant", "content": call("lookup_ticket", ticket_id=values["ticket"])},
             {"role": "tool", "content": LOOKUP_RESULT.format(**values)}]
    second = first + [{"role": "assistant", "content": call("check_light_level", line_id=values["line"])},
                      {"role": "tool", "content": READ_RESULT["red"].format(**values)}]
    return [_item(first, call("check_light_level", line_id=values["line"]), values["ticket"], "red_drop_step2", 2),
            _item(second, call("check_splitter", cabinet=values["cabinet"], splitter=values["splitter"]),
                  values["ticket"], "red_drop_step3", 3)]


def _item(turns: list[dict[str, str]], reference: str, case: str, intent: str, step: int) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": SYSTEM}, *turns, {"role": "assistant", "content": reference}],
            "metadata": {"case": case, "intent": intent, "step": step, "tool": json.loads(reference)["name"]}}


SUITE_HEAD = """\
# The Nightwatch desk's tool calls: the held-out suite of desk_eval.jsonl (written by build_desk_data.py).
# Upload desk_eval.jsonl, put the dataset id it gets in place of DESK_EVAL_DATASET_ID, and create the suite.
name: nightwatch-desk-calls
dataset: DESK_EVAL_DATASET_ID
cluster_key: case            # items about one ticket and line are resampled together
decoding: {max_new_tokens: 64, batch_size: 16, max_prompt_tokens: 384}
kpis:
  - name: tool_call          # primary: the right tool with exactly the right arguments
    grader: {type: tool_call}
  - name: overlap            # ROUGE-L of the output against the reference call
    grader: {type: similarity, metric: rouge_l}
    allowed_regression: 0.02
  - name: valid_call         # the output is one JSON call of a desk tool, valid against its schema
    allowed_regression: 0.02
    grader:
      type: json_schema
      schema: """


def call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A call of any desk tool: its name and arguments valid against that tool's parameters."""
    return {"oneOf": [{"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                       "properties": {"name": {"const": tool["name"]}, "arguments": tool["parameters"]}}
                      for tool in tools]}


def main() -> None:
    held_out: dict[str, set[str]] = {"ticket": set(), "line": set(), "cabinet": set()}
    items = eval_items(random.Random(20), held_out)
    generator = {"type": "template", "templates": templates(), "slots": slots(random.Random(8), held_out)}
    (HERE / "desk_templates.json").write_text(json.dumps(generator, indent=1) + "\n", encoding="utf-8")
    requests = {**generator, "templates": instruction_templates(generator["templates"])}
    (HERE / "desk_instructions.json").write_text(json.dumps(requests, indent=1) + "\n", encoding="utf-8")
    with (HERE / "desk_eval.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(item) + "\n" for item in items)
    (HERE / "desk_log.txt").write_text(desk_log(random.Random(31), held_out), encoding="utf-8")
    tools = json.loads((HERE / "desk_tools.json").read_text(encoding="utf-8"))
    (HERE / "desk_suite.yaml").write_text(SUITE_HEAD + json.dumps(call_schema(tools)) + "\n", encoding="utf-8")
    print(f"{len(generator['templates'])} templates, {len(items)} eval items in "
          f"{len({i['metadata']['case'] for i in items})} cases")


if __name__ == "__main__":
    main()
