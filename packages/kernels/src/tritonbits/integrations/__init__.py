"""Optional integrations with other libraries. Each submodule imports its library only when it is imported
itself (``import tritonbits`` imports none of them): ``tritonbits.integrations.bitsandbytes`` needs the
``tritonbits[bnb]`` extra."""
