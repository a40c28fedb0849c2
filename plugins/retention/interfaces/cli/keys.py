"""``keygen``: a signing key pair."""

from __future__ import annotations

import argparse

from retention.interfaces.cli.options import EXIT_OK


def register(commands: argparse._SubParsersAction) -> None:
    """The ``keygen`` command."""
    cmd = commands.add_parser("keygen", help="create an Ed25519 signing key pair")
    cmd.add_argument("--out", required=True, metavar="DIR")
    cmd.set_defaults(handler=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    from retention.evidence.signing import SIGNING_KEY_ENV, Signer, generate_keypair, keyring_line

    private_path, public_path = generate_keypair(args.out)
    print(f"private key: {private_path} (keep secret; set {SIGNING_KEY_ENV}={private_path})")
    print(f"public key:  {public_path} (give to verifiers: retention verify --public-key {public_path})")
    line = keyring_line(Signer.from_pem_file(private_path).private_key.public_key())
    print(f"keyring line: {line}")
    print("  (FIRST_SEQ: the seq of the first certificate it signs, the chain's head + 1; end the previous "
          "key's line with its last seq)")
    return EXIT_OK
