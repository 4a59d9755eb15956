"""Language data for the identity audit: one file per language, data only.

Each `<code>.py` file here (files starting with `_` excepted) holds one assignment,
`LANGUAGE = {...}`, made of literals only; it is read with `ast.literal_eval`, never imported or
run. Adding a language means adding a file. The keys:

- `code`, `name`: "en", "English".
- `script`: a regex; a sentence is tried against this language's claims only if it contains a match.
- `models`, `ambiguous_models`, `orgs`, `ambiguous_orgs`: this language's own spellings of names, in
  the notation of `dsv3.audit.names` (which holds the names every language shares).
- `terms`: named regex fragments that claims refer to as `{name}`; a term may refer to other terms.
- `claims`: the constructions in which a speaker says who it is or who made it. Each is a dict with
  `id`, `reason` (one line for people), `pattern` (a regex, matched without regard to case),
  `rewrite` (whether replacing the names in it with the configured identity and creator gives a
  true sentence), optionally `assistant_only` (the construction counts only in an assistant's turn
  of a chat) and `examples` (sentences it must flag; the tests check them).
  In a pattern `{model}` and `{org}` mark the name slots that a fix replaces; `{any_model}` and
  `{any_org}` match a name without marking a slot.
- `ai_cue`: a regex for words that say the sentence is about AI; an ambiguous name needs one.
- `cancel_before`: {label: regex}; a claim does not count when the text between the start of its
  sentence and the claim matches (so each regex ends with `$`): negation, a hypothetical, reported
  speech, someone else's belief.
- `cancel_after`: {label: regex} matched at the text right after the claim (a question particle).
- `cancel_inside`: {label: regex} searched inside the claim itself (a negation in a gap).
- `quotes`: [open, close] pairs; a claim inside quotation marks is somebody being quoted.
"""
