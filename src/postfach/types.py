"""Distinct integer types, so that sequence numbers and UIDs never mix (mox's msgseq vs UID)."""

from __future__ import annotations

from typing import NewType

Uid = NewType("Uid", int)
SeqNum = NewType("SeqNum", int)
ModSeq = NewType("ModSeq", int)
UidValidity = NewType("UidValidity", int)
AccountId = NewType("AccountId", int)
MailboxId = NewType("MailboxId", int)
BlobId = NewType("BlobId", str)  # hex sha256 of the stored bytes
QueueId = NewType("QueueId", int)
