"""Tests of the search: environments, agents and voting, surrogate, and the HiReLC loop."""
