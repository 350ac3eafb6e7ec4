"""The foundation every other package stands on: settings, the OpenMP wait policy, model loading,
the prompt layout and prepend, and the database connection. It imports nothing of ours.

Importing it sets how torch's OpenMP threads wait (openmp.py), so every entry point imports a
package of ours (and so this one) before torch loads.
"""

from core.openmp import set_wait_policy

set_wait_policy()
