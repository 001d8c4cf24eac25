"""Block identities for prefix caching: equal exactly when every token up to the block's end
is equal, salted by the settings that change the KV, the same in every process."""

from __future__ import annotations

import subprocess
import sys

from pdserve.engine.prefix_hash import block_hashes, hash_salt

SALT = hash_salt("model", "auto", 4)


def test_full_blocks_only_and_chained() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, SALT)
    assert len(a) == 2  # the ninth token's block is not full
    same_prefix = block_hashes([1, 2, 3, 4, 5, 6, 7, 0], 4, SALT)
    assert same_prefix[0] == a[0] and same_prefix[1] != a[1]
    # a later block with the same tokens but another history is another block
    assert block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4, SALT)[1] != a[1]
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, SALT, start=1) == a[1:]


def test_settings_salt_the_chain() -> None:
    tokens = list(range(8))
    base = block_hashes(tokens, 4, SALT)
    assert block_hashes(tokens, 4, hash_salt("other", "auto", 4)) != base
    assert block_hashes(tokens, 4, hash_salt("model", "int8", 4)) != base


def test_hashes_agree_across_processes() -> None:
    code = (
        "from pdserve.engine.prefix_hash import block_hashes, hash_salt;"
        "print(block_hashes(list(range(8)), 4, hash_salt('model', 'auto', 4)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(block_hashes(list(range(8)), 4, SALT))
