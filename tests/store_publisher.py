"""Subprocess for the crash test: publishes versions in a loop until it is killed."""

import sys

import torch

from prompt_store import ModelFingerprint, open_store

store = open_store(sys.argv[1])
fingerprint = ModelFingerprint(hidden_size=64, vocab_size=10, embedding_sha256="x")
print("ready", flush=True)
while True:
    store.publish("crash", torch.randn(256, 64), fingerprint=fingerprint, base_model="tiny")
