"""The datapath: the only code that imports bcc or pyroute2 or calls bpf(2).

loader.py compiles, pins and attaches; maps.py applies planner operations in batches."""
