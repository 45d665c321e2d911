"""Exemplar clauses for the semantic restart check (``segmentation.RestartDetector``), written for this package.

``RESTART``: clauses that abandon what came before and start the answer again (self-correction, apology for a
digression, a return to the question). ``NOT_RESTART``: clauses that carry the same cue words but continue,
elaborate or repeat an answer (the paper's judge prompt: elaboration is not a new attempt). A candidate clause is a
restart when its nearest ``RESTART`` exemplars are closer (MiniLM cosine) than its nearest ``NOT_RESTART`` ones.
The labelled evaluation set (tests/data/restart_cases.jsonl) was written separately, in other words; bump
``EXEMPLAR_VERSION`` whenever a line here changes (it is part of the offline judge's cache key)."""

from __future__ import annotations

EXEMPLAR_VERSION = "restart-exemplars-v1"

RESTART: tuple[str, ...] = (
    "Wait, that's not right.",
    "Hold on, this has nothing to do with what you asked.",
    "Hmm, no, that is beside the point.",
    "Oops, I wandered off the subject.",
    "Sorry, I went off on a tangent there.",
    "I apologize, that was a mistake.",
    "My apologies for the confusion.",
    "I'm sorry, I got distracted.",
    "Let me get back to your question.",
    "Back to what you actually asked.",
    "Returning to the topic at hand.",
    "Let me refocus on the question.",
    "Scratch that.",
    "Never mind that part.",
    "Ignore what I just said.",
    "That was irrelevant to your request.",
    "I drifted away from the topic.",
    "I got sidetracked by something unrelated.",
    "Let me answer properly this time.",
    "OK, let me restart.",
    "Let me correct myself.",
    "That's not what you were asking about.",
    "I seem to have lost the thread.",
    "Whoops, wrong subject entirely.",
    "No, that doesn't answer your question at all.",
    "Actually, I made an error there.",
    "Let me redo that answer.",
    "Correction: I misunderstood the question.",
)

NOT_RESTART: tuple[str, ...] = (
    "Actually, you can also use a stand mixer for this.",
    "Actually, this works best in the morning.",
    "Let me explain that step again in more detail.",
    "Again, keep the heat low while it simmers.",
    "Once again, make sure everything is unplugged.",
    "Back to the oven: it should be very hot.",
    "Go back to the first page and sign it.",
    "Instead of butter, you can use olive oil.",
    "Don't worry if you make a mistake at first.",
    "A common mistake is to skip the warm-up.",
    "Sorry to hear you're having trouble with it.",
    "No, you don't need any special tools.",
    "Wait until the glue is completely dry.",
    "Hold on to the receipt in case you need a refund.",
    "Correct the seasoning with a pinch of salt.",
    "To answer your question briefly: yes, it is safe.",
    "Focus on one room at a time.",
    "It's easy to get distracted, so set a timer.",
    "Start over from step one if the dough tears.",
    "Rather than guessing, measure the space first.",
    "If you get confused, check the manual.",
    "Hmm, that depends on the size of your garden.",
    "The wrong size of bolt will strip the thread.",
    "Repeat this again for the other side.",
    "Then try again after five minutes if it does not start.",
    "Let me also mention a useful shortcut.",
    "To revise your draft, read it aloud.",
    "An unrelated but useful tip is to label the boxes.",
)
