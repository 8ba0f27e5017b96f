"""The loss terms each hashing preset logs, shared by the method and training tests."""

from __future__ import annotations

# Terms each preset logs: the loss combination of its paper (Table 2 of the survey and
# shared/reference/deep-hashing.md), plus the discriminator's own loss for adversarial methods.
EXPECTED_TERMS: dict[str, set[str]] = {  # hash layers: test_methods.py
    "dhnn": {"pairwise", "quantization"},
    "sidhcnn": {"pairwise", "cross_pairwise", "quantization", "bit_balance"},
    "duch": {"cross_ntxent", "quantization", "bit_balance_code"},
    "contrastive": {"cross_ntxent", "quantization", "bit_balance_code"},
    "milan": {"triplet", "push", "bit_balance_code"},
    "dhcnn": {"pairwise", "quantization", "cross_entropy"},
    "sshaae": {
        "reconstruction",
        "adversarial",
        "bit_balance",
        "cross_entropy",
        "pairwise",
        "quantization",
        "discriminator",
    },
    "adversarial": {"pairwise", "cross_entropy", "adversarial", "quantization", "discriminator"},
    "ce": {"cross_entropy"},
    "triplet": {"triplet_mined"},
    # hash centres / proxies (beyond Table 3)
    "csq": {"central", "csq_quantization"},
    "orthohash": {"orthohash"},
}
