"""The registry aliases langops moves: what serves, what served before, and the latest version judged."""

CHAMPION = "champion"  # the version the model server answers with
PREVIOUS_CHAMPION = "previous_champion"  # what `langops rollback` returns to
CHALLENGER = "challenger"  # the latest version the gate judged, promoted or not
CHAMPION_SINCE_TAG = "langops.champion_since"  # model-version tag: when it last became champion
ROLLOUT_TAG = "langops.rollout"  # registered-model tag: the shadow or canary in progress, as JSON (langops.rollouts)
ROLLOUT_EFFECT_TAG = "langops.rollout_effect"  # on a rollout's log record: the rollout tag its change leaves
