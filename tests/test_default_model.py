"""The real embedded default model, end to end, on obvious sentences."""

import numpy as np
import pytest

from adainfer_ray.engine import EarlyExitEngine
from adainfer_ray.policy import SHIPPED_POLICIES, ExitPolicy
from adainfer_ray.prompts import SENTIMENT, PromptEncoder

POSITIVE = ["This is the best movie I have seen in years, I loved every minute.",
            "Wonderful food, friendly staff, and a beautiful view. Highly recommended!",
            "The book is brilliant, moving and funny. An absolute joy to read."]
NEGATIVE = ["Terrible service, cold food and a rude waiter.",
            "The worst film of the year: boring, ugly and far too long.",
            "It stopped working after one day and the support team ignored me. Awful."]


@pytest.mark.slow
@pytest.mark.parametrize("policy_name", ["full", "default"])
def test_default_model_labels_obvious_sentences(default_lm, policy_name):
    enc = PromptEncoder(SENTIMENT, default_lm.tokenizer, default_lm.max_context)
    if policy_name == "full":
        policy = ExitPolicy.full_depth()
    else:
        folder = SHIPPED_POLICIES / "smollm2-135m-sentiment"
        if not (folder / "policy.json").exists():
            pytest.skip("the default policy has not been calibrated into the package yet")
        policy = ExitPolicy.load(folder)
        policy.check_compatible(default_lm.model_hash, SENTIMENT.fingerprint(), default_lm.num_layers)
    b = enc.encode(POSITIVE + NEGATIVE)
    out = EarlyExitEngine(default_lm, enc.label_token_ids, policy, prefix_ids=b.prefix_ids).classify(b.item_ids)
    labels = [SENTIMENT.labels[i] for i in out["label"]]
    assert labels == ["positive"] * 3 + ["negative"] * 3
    assert (out["label_score"] > 0.5).all()
    if policy_name == "default":  # obvious items are exactly the ones that should leave early
        assert np.mean(out["exit_layer"]) < default_lm.num_layers
