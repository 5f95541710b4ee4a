"""The registry aliases langops moves: what serves, what served before, and the latest version judged."""

CHAMPION = "champion"  # the version the model server answers with
PREVIOUS_CHAMPION = "previous_champion"  # what `langops rollback` returns to
CHALLENGER = "challenger"  # the latest version the gate judged, promoted or not
CHAMPION_SINCE_TAG = "langops.champion_since"  # model-version tag: when it last became champion
