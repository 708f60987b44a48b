"""The adapter's version and the SGLang releases it was verified against."""

__version__ = "0.1.0"

#: SGLang versions whose internals (recorder interface, hook sites, file layout) were read and
#: tested; a PEP 440 specifier checked from package metadata before any sglang import. Exactly
#: 0.5.23 (a local build label such as +cu130 aside): SGLang's .postN releases have changed
#: internals before.
SUPPORTED = "==0.5.23"
